//! The NSP plugin's state: configuration, target registry and conduit
//! connections, kept consistent under one lock. Every real change is
//! persisted, published to watchers and written to the LB maps.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;
use tokio::sync::{watch, Mutex};

use super::conduits::{Connection, Pools};
use super::config::{NspConfig, NspConfigError, StreamPath};
use super::registry::{Kind, Registry, RegistryError, Status, Target};
use crate::lb::model::{TargetSpec, TargetVia};
use crate::lb::service::LbService;
use crate::net::{self, netns, netns::NetnsId, NetError, Prefix};

/// What watchers see.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub config: Arc<NspConfig>,
    /// This node's registry.
    pub targets: Vec<Target>,
    /// In cluster mode: this node's name, and the other nodes' targets.
    pub node: Option<String>,
    pub remote: Vec<RemoteTarget>,
}

/// A target of another node's registry (cluster mode).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RemoteTarget {
    pub node: String,
    /// The node's tunnel address; `None`: its node record is missing.
    pub address: Option<std::net::Ipv4Addr>,
    /// On a conduit of its node (else not load-balanced to).
    pub served: bool,
    pub target: Target,
}

/// Cluster-wide identifier claims, asked before a target is ENABLED.
#[async_trait::async_trait]
pub trait IdClaims: Send + Sync {
    /// Claims `id` of `stream` for `target` of this node: `Ok(false)` when
    /// another target holds it, `Err` when the cluster cannot answer (the
    /// registration then goes on locally).
    async fn claim(&self, stream: &StreamPath, id: u32, target: &Target) -> Result<bool, String>;
}

#[derive(Debug, Error)]
pub enum NspError {
    #[error("{0}")]
    Registry(#[from] RegistryError),
    #[error("{0}")]
    Config(#[from] NspConfigError),
    #[error("conduit {conduit:?} of trench {trench:?} is not configured")]
    UnknownConduit { trench: String, conduit: String },
    #[error(
        "the conduit address pools are exhausted ({0} connections); widen nsp.conduit_prefix_v4/v6"
    )]
    PoolExhausted(u32),
    #[error("cannot identify the caller's network namespace: {0}")]
    Caller(String),
    #[error(
        "target ips {0:?} are not the addresses of a conduit of the calling network namespace"
    )]
    NotYours(Vec<String>),
    #[error("conduit interface: {0}")]
    Net(#[from] NetError),
    #[error("writing the LB maps: {0}")]
    Lb(String),
    /// A per-caller limit of `[nsp.limits]`.
    #[error("limit nsp.limits.{name} = {value} reached: {detail}")]
    Limit {
        name: &'static str,
        value: u32,
        detail: String,
    },
}

fn limit(name: &'static str, value: u32, detail: String) -> NspError {
    NspError::Limit {
        name,
        value,
        detail,
    }
}

/// Who is calling: the peer of the node socket.
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    pub pid: i32,
    pub uid: u32,
}

struct Inner {
    config: Arc<NspConfig>,
    registry: Registry,
    connections: Vec<Connection>,
    next_link: u32,
    /// What the state file holds (nothing is written while it is unchanged).
    persisted: Vec<u8>,
    remote: Vec<RemoteTarget>,
}

#[derive(serde::Serialize, serde::Deserialize, Default)]
struct Persisted {
    targets: Vec<Target>,
    connections: Vec<Connection>,
    next_link: u32,
}

pub struct Settings {
    pub state_file: PathBuf,
    pub pools: Pools,
    pub mtu: u32,
    pub limits: crate::config::NspLimits,
}

pub struct Nsp {
    inner: Mutex<Inner>,
    /// Cluster mode: this node's name and the identifier claims.
    cluster: std::sync::RwLock<Option<(String, Arc<dyn IdClaims>)>>,
    published: watch::Sender<Snapshot>,
    lb: Arc<LbService>,
    settings: Settings,
}

pub const LB_SOURCE: &str = "nsp";
/// Node-side conduit interfaces are `tmc<hex>`.
const LINK_PREFIX: &str = "tmc";

impl Nsp {
    pub fn new(lb: Arc<LbService>, settings: Settings, expiry: Duration) -> Self {
        Self {
            inner: Mutex::new(Inner {
                config: Arc::default(),
                registry: Registry::new(expiry),
                connections: Vec::new(),
                next_link: 0,
                persisted: Vec::new(),
                remote: Vec::new(),
            }),
            cluster: Default::default(),
            published: watch::channel(Snapshot::default()).0,
            lb,
            settings,
        }
    }

    /// Cluster mode: identifiers are claimed through `claims` before a
    /// target is enabled, and watchers see the node's name.
    pub fn join_cluster(&self, node: String, claims: Arc<dyn IdClaims>) {
        *self.cluster.write().expect("cluster lock") = Some((node, claims));
    }

    /// Replaces the other nodes' targets (a change from the cluster).
    /// The other nodes' targets the first commit ([`Nsp::start`]) writes
    /// with this node's: the cluster view kept from before a restart, so a
    /// kept dataplane does not send their flows to this node's targets until
    /// etcd answers.
    pub async fn stage_remote(&self, mut remote: Vec<RemoteTarget>) {
        remote.sort_by(|a, b| (&a.node, a.target.key()).cmp(&(&b.node, b.target.key())));
        self.inner.lock().await.remote = remote;
    }

    pub async fn set_remote(&self, mut remote: Vec<RemoteTarget>) -> Result<(), NspError> {
        // One order on every node, whatever order they arrived in.
        remote.sort_by(|a, b| (&a.node, a.target.key()).cmp(&(&b.node, b.target.key())));
        let mut inner = self.inner.lock().await;
        if inner.remote == remote {
            return Ok(());
        }
        for r in &remote {
            if let Some(why) = unusable_here(&inner.config, r) {
                if !inner.remote.contains(r) {
                    tracing::warn!(
                        node = r.node,
                        "its target {}: {why}; listed DISABLED here",
                        r.target.key()
                    );
                }
            }
        }
        let before = std::mem::replace(&mut inner.remote, remote);
        if let Err(e) = self.commit(&mut inner).await {
            inner.remote = before;
            return Err(e);
        }
        Ok(())
    }

    pub fn subscribe(&self) -> watch::Receiver<Snapshot> {
        self.published.subscribe()
    }

    pub fn snapshot(&self) -> Snapshot {
        self.published.borrow().clone()
    }

    /// Loads the persisted registry and connections (connections whose
    /// interface is gone are dropped) and applies `config`.
    pub async fn start(&self, config: NspConfig) -> Result<(), NspError> {
        let bytes = std::fs::read(&self.settings.state_file).ok();
        let persisted: Persisted = bytes
            .as_ref()
            .and_then(|b| {
                serde_json::from_slice(b)
                    .map_err(|e| {
                        tracing::warn!(
                            "registry state {}",
                            crate::statefile::refused(&self.settings.state_file, &e)
                        )
                    })
                    .ok()
            })
            .unwrap_or_default();
        let mut inner = self.inner.lock().await;
        inner.registry.restore(persisted.targets, Instant::now());
        for c in persisted.connections {
            match net::link::exists(&c.link.host_ifname).await {
                Ok(false) => {
                    // Its targets go with it: their addresses may be handed out again.
                    inner.registry.remove_ips(&c.local_ips());
                }
                Ok(true) => {
                    self.attach(&c.link.host_ifname).await;
                    inner.connections.push(c)
                }
                Err(e) => {
                    tracing::warn!("cannot check {}: {e}; keeping it", c.link.host_ifname);
                    inner.connections.push(c);
                }
            }
        }
        // Conduit links no connection owns (a connect cut short) are removed.
        if let Ok(links) = net::link::with_prefix(LINK_PREFIX).await {
            for name in links {
                if !inner.connections.iter().any(|c| c.link.host_ifname == name) {
                    tracing::info!("removing {name}: no conduit connection owns it");
                    let _ = net::link::delete(&name).await;
                }
            }
        }
        inner.next_link = persisted.next_link;
        inner.persisted = match bytes {
            Some(b) => b,
            None => to_json(&Persisted::default()),
        };
        inner.config = Arc::new(config);
        match self.commit(&mut inner).await {
            Err(e) if !inner.remote.is_empty() => {
                tracing::warn!(
                    "the other nodes' targets kept from before the restart do not apply ({e}); starting without them"
                );
                inner.remote.clear();
                self.commit(&mut inner).await
            }
            done => done,
        }
    }

    /// Persists, publishes and writes the LB maps after a change.
    async fn commit(&self, inner: &mut Inner) -> Result<(), NspError> {
        let mut spec = inner.config.lb_spec();
        spec.targets = lb_targets(inner);
        let left_out = remote_lb_targets(inner, &mut spec.targets);
        self.lb
            .set_source(LB_SOURCE, spec)
            .await
            .map_err(|e| NspError::Lb(e.to_string()))?;
        let persisted = Persisted {
            targets: inner.registry.targets(),
            connections: inner.connections.clone(),
            next_link: inner.next_link,
        };
        let bytes = to_json(&persisted);
        if bytes != inner.persisted {
            match crate::statefile::write_atomically(&self.settings.state_file, &bytes) {
                Ok(()) => inner.persisted = bytes,
                Err(e) => tracing::error!(
                    "persisting the registry to {}: {e}",
                    self.settings.state_file.display()
                ),
            }
        }
        let snapshot = Snapshot {
            config: inner.config.clone(),
            targets: persisted.targets,
            node: self.cluster_node(),
            remote: inner
                .remote
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    let mut r = as_seen_here(&inner.config, r);
                    if left_out.contains(&i) {
                        r.target.status = Status::Disabled;
                    }
                    r
                })
                .collect(),
        };
        self.published.send_if_modified(|old| {
            let changed = *old != snapshot;
            *old = snapshot;
            changed
        });
        Ok(())
    }

    /// Replaces the configuration (a reload). On failure nothing changes.
    pub async fn set_config(&self, config: NspConfig) -> Result<(), NspError> {
        let mut inner = self.inner.lock().await;
        let previous = std::mem::replace(&mut inner.config, Arc::new(config));
        if let Err(e) = self.commit(&mut inner).await {
            inner.config = previous;
            return Err(e);
        }
        // A lower max_targets: targets above it get no traffic, and say so
        // (their ambassadors register again, within the new range if room).
        let above: Vec<(String, u32)> = inner
            .registry
            .targets()
            .into_iter()
            .filter_map(|t| {
                let (Status::Enabled, Some(path), Some(id)) = (t.status, &t.stream, t.identifier())
                else {
                    return None;
                };
                let max = inner.config.stream(path)?.max_targets;
                (id > max).then(|| (t.key(), id))
            })
            .collect();
        if !above.is_empty() {
            for (key, id) in &above {
                inner.registry.disable(key, *id);
            }
            tracing::info!(
                "{} targets DISABLED: their identifiers are above their stream's max_targets now",
                above.len()
            );
            if let Err(e) = self.commit(&mut inner).await {
                tracing::error!("after disabling targets above max_targets: {e}");
            }
        }
        self.reconcile_vips(&mut inner).await;
        Ok(())
    }

    pub async fn register(&self, caller: Caller, target: Target) -> Result<(), NspError> {
        let limits = &self.settings.limits;
        if target.ips.len() > limits.ips_per_target as usize {
            return Err(limit(
                "ips_per_target",
                limits.ips_per_target,
                format!("the target has {} ips", target.ips.len()),
            ));
        }
        let context: usize = target.context.iter().map(|(k, v)| k.len() + v.len()).sum();
        if context > limits.context_bytes as usize {
            return Err(limit(
                "context_bytes",
                limits.context_bytes,
                format!("the target's context has {context} bytes"),
            ));
        }
        let mut inner = self.inner.lock().await;
        check_owner(&inner, caller, &target)?;
        if let Some(held) = inner.registry.others_with_ips(&target) {
            if held >= limits.targets_per_conduit as usize {
                return Err(limit(
                    "targets_per_conduit",
                    limits.targets_per_conduit,
                    format!("ips {:?} already have {held} targets", target.ips),
                ));
            }
        }
        let config = inner.config.clone();
        let before = inner.registry.clone();
        let probe = target.clone();
        if inner.registry.register(target, &config, Instant::now())? {
            if let Err(e) = self.check_cluster(&inner, &before, probe).await {
                inner.registry = before;
                return Err(e);
            }
            if let Err(e) = self.commit(&mut inner).await {
                inner.registry = before;
                return Err(e);
            }
        }
        Ok(())
    }

    pub async fn unregister(&self, caller: Caller, target: Target) -> Result<(), NspError> {
        let mut inner = self.inner.lock().await;
        check_owner(&inner, caller, &target)?;
        let before = inner.registry.clone();
        if inner.registry.unregister(target)? {
            if let Err(e) = self.commit(&mut inner).await {
                inner.registry = before;
                return Err(e);
            }
        }
        Ok(())
    }

    /// Cluster mode: another node's target won identifier `id`, which this
    /// node's target `key` had enabled while etcd was away. It goes back to
    /// DISABLED, so its owner's next refresh meets the collision and picks
    /// another identifier (Meridio's rule), and no node balances to both.
    pub async fn lost_identifier(&self, key: &str, id: u32) -> Result<bool, NspError> {
        let mut inner = self.inner.lock().await;
        let before = inner.registry.clone();
        if !inner.registry.disable(key, id) {
            return Ok(false);
        }
        if let Err(e) = self.commit(&mut inner).await {
            inner.registry = before;
            return Err(e);
        }
        Ok(true)
    }

    fn cluster_node(&self) -> Option<String> {
        let cluster = self.cluster.read().expect("cluster lock");
        cluster.as_ref().map(|(node, _)| node.clone())
    }

    /// A target being enabled (or changing its identifier) must hold its
    /// identifier cluster-wide: no other node's ENABLED target has it, and
    /// the claim is ours. Unreachable claims let it go on locally.
    async fn check_cluster(
        &self,
        inner: &Inner,
        before: &Registry,
        target: Target,
    ) -> Result<(), NspError> {
        let claims = self.cluster.read().expect("cluster lock").clone();
        let Some((node, claims)) = claims else {
            return Ok(());
        };
        let Some(now) = inner
            .registry
            .targets()
            .into_iter()
            .find(|t| t.key() == registry_key(&target))
        else {
            return Ok(());
        };
        let (Status::Enabled, Kind::Default, Some(path), Some(id)) =
            (now.status, now.kind, &now.stream, now.identifier())
        else {
            return Ok(());
        };
        let was = before.targets().into_iter().find(|t| t.key() == now.key());
        if was.is_some_and(|w| w.status == Status::Enabled && w.identifier() == Some(id)) {
            return Ok(());
        }
        let collision = || RegistryError::Collision {
            stream: path.full_name(),
            identifier: id,
        };
        if inner.remote.iter().any(|r| {
            r.target.status == Status::Enabled
                && r.target.stream.as_ref() == Some(path)
                && r.target.identifier() == Some(id)
        }) {
            return Err(collision().into());
        }
        match claims.claim(path, id, &now).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(collision().into()),
            Err(e) => {
                tracing::warn!(
                    node,
                    "identifier {id} of {} claimed locally only: {e}",
                    path.full_name()
                );
                Ok(())
            }
        }
    }

    /// Drops expired targets and connections whose interface disappeared
    /// (their namespace was deleted).
    pub async fn housekeeping(&self, check_links: bool) {
        let mut inner = self.inner.lock().await;
        let mut changed = inner.registry.expire(Instant::now());
        if check_links {
            let mut gone = Vec::new();
            for c in &inner.connections {
                match net::link::exists(&c.link.host_ifname).await {
                    Ok(false) => gone.push(c.link.host_ifname.clone()),
                    Ok(true) => {}
                    Err(e) => tracing::debug!("cannot check {}: {e}", c.link.host_ifname),
                }
            }
            for name in gone {
                tracing::info!("conduit interface {name} is gone; forgetting its connection");
                // Its programs went with it; what the dataplane recorded must go too,
                // or status and metrics list it as detached by someone else forever.
                if let Err(e) = self.lb.dataplane().detach_container(&name).await {
                    tracing::debug!("forgetting the conduit programs of {name}: {e}");
                }
                if let Some(i) = inner
                    .connections
                    .iter()
                    .position(|c| c.link.host_ifname == name)
                {
                    let c = inner.connections.remove(i);
                    inner.registry.remove_ips(&c.local_ips());
                }
                changed = true;
            }
        }
        if changed {
            if let Err(e) = self.commit(&mut inner).await {
                tracing::error!("after expiry: {e}");
            }
        }
    }

    /// Gives the caller's namespace its interface on the conduit (idempotent).
    pub async fn connect(
        &self,
        caller: Caller,
        trench: &str,
        conduit: &str,
    ) -> Result<Connection, NspError> {
        let (netns, id) =
            netns::of_pid(caller.pid, None).map_err(|e| NspError::Caller(e.to_string()))?;
        if Some(id) == NetnsId::own() {
            return Err(NspError::Caller(
                "the caller is in the node's own network namespace; run the ambassador in the application's".into(),
            ));
        }
        let mut inner = self.inner.lock().await;
        if !inner
            .config
            .conduits
            .iter()
            .any(|c| c.trench == trench && c.name == conduit)
        {
            return Err(NspError::UnknownConduit {
                trench: trench.into(),
                conduit: conduit.into(),
            });
        }
        if let Some(c) = inner
            .connections
            .iter_mut()
            .find(|c| c.netns == id && c.trench == trench && c.conduit == conduit)
        {
            c.pid = caller.pid;
            let host = c.link.host_ifname.clone();
            self.reconcile_vips(&mut inner).await;
            let c = inner
                .connections
                .iter()
                .find(|c| c.link.host_ifname == host);
            return Ok(c.cloned().expect("found above"));
        }
        let limits = &self.settings.limits;
        let in_netns = inner.connections.iter().filter(|c| c.netns == id).count();
        if in_netns >= limits.conduits_per_netns as usize {
            return Err(limit(
                "conduits_per_netns",
                limits.conduits_per_netns,
                format!(
                    "network namespace {} has {in_netns} conduits",
                    id.describe()
                ),
            ));
        }
        // Root's ambassadors are the operator's: not counted against one uid.
        let of_uid = inner
            .connections
            .iter()
            .filter(|c| c.uid == caller.uid)
            .count();
        if caller.uid != 0 && of_uid >= limits.conduits_per_uid as usize {
            return Err(limit(
                "conduits_per_uid",
                limits.conduits_per_uid,
                format!("uid {} has {of_uid} conduits", caller.uid),
            ));
        }
        let pools = &self.settings.pools;
        let block = pools
            .free_block(inner.connections.iter().map(|c| c.block))
            .ok_or(NspError::PoolExhausted(pools.blocks()))?;
        let (gateways, local) = pools.block(block);
        let index = (0..)
            .find(|n| {
                !inner
                    .connections
                    .iter()
                    .any(|c| c.netns == id && c.table == 100 + n)
            })
            .unwrap_or(0);
        let host = format!("tmc{:05x}", inner.next_link & 0xf_ffff);
        inner.next_link = inner.next_link.wrapping_add(1);
        let link = net::veth::create(
            &netns,
            &host,
            &format!("conduit{index}"),
            &gateways,
            &local,
            self.settings.mtu,
            None,
        )
        .await?;
        self.attach(&host).await;
        let connection = Connection {
            netns: id,
            pid: caller.pid,
            uid: caller.uid,
            trench: trench.into(),
            conduit: conduit.into(),
            block,
            link,
            local,
            gateways,
            vips: Vec::new(),
            table: 100 + index,
        };
        inner.connections.push(connection);
        self.reconcile_vips(&mut inner).await;
        if let Err(e) = self.commit(&mut inner).await {
            inner.connections.pop();
            let _ = net::link::delete(&host).await;
            return Err(e);
        }
        Ok(inner.connections.last().cloned().expect("just pushed"))
    }

    pub async fn disconnect(
        &self,
        caller: Caller,
        trench: &str,
        conduit: &str,
    ) -> Result<(), NspError> {
        let (_, id) =
            netns::of_pid(caller.pid, None).map_err(|e| NspError::Caller(e.to_string()))?;
        let mut inner = self.inner.lock().await;
        let Some(i) = inner
            .connections
            .iter()
            .position(|c| c.netns == id && c.trench == trench && c.conduit == conduit)
        else {
            return Ok(());
        };
        let host = inner.connections[i].link.host_ifname.clone();
        // The policy rules of its VIPs live in the application's namespace,
        // not on the veth: they go first (a later conduit there would find
        // them pointing at its table).
        let c = &inner.connections[i];
        if let Ok((app, _)) = netns::of_pid(caller.pid, Some(id)) {
            let gateways = c.gateway_addrs();
            let cleared =
                net::route::set_vips(&app, &c.link.peer_ifname, &c.local, &[], &gateways, c.table)
                    .await;
            if let Err(e) = cleared {
                tracing::warn!("conduit {host}: removing its VIPs' rules: {e}");
            }
        }
        if let Err(e) = self.lb.dataplane().detach_container(&host).await {
            tracing::debug!("detaching the conduit programs from {host}: {e}");
        }
        net::link::delete(&host).await?;
        let c = inner.connections.remove(i);
        inner.registry.remove_ips(&c.local_ips());
        self.commit(&mut inner).await
    }

    /// Replies of a conduit's targets pass its node-side veth: the conduit
    /// program there undoes port NATs. Without it only replies of
    /// translated ports go wrong, so a failure is logged, not fatal.
    async fn attach(&self, host: &str) {
        match self.lb.dataplane().attach_conduit(host).await {
            Ok(()) => {}
            Err(crate::dataplane::DataplaneError::NotRunning) => {}
            Err(e) => tracing::error!("conduit {host}: replies keep translated ports: {e}"),
        }
    }

    /// Puts each connection's VIPs (those of its conduit's flows) on its interface.
    async fn reconcile_vips(&self, inner: &mut Inner) {
        let config = inner.config.clone();
        for c in &mut inner.connections {
            let vips: Vec<Prefix> = config
                .conduit_vips(&c.trench, &c.conduit)
                .iter()
                .filter_map(|v| v.parse().ok())
                .collect();
            if vips == c.vips {
                continue;
            }
            let netns = match netns::of_pid(c.pid, Some(c.netns)) {
                Ok((file, _)) => file,
                Err(e) => {
                    tracing::debug!(
                        "VIPs of {} wait for its ambassador: {e}",
                        c.link.host_ifname
                    );
                    continue;
                }
            };
            match net::route::set_vips(
                &netns,
                &c.link.peer_ifname,
                &c.local,
                &vips,
                &c.gateway_addrs(),
                c.table,
            )
            .await
            {
                Ok(()) => c.vips = vips,
                Err(e) => tracing::error!("VIPs on {}: {e}", c.link.host_ifname),
            }
        }
    }

    /// The connection of the caller's namespace whose addresses are `ips`.
    pub async fn connections(&self) -> Vec<Connection> {
        self.inner.lock().await.connections.clone()
    }
}

/// Only a target's own namespace (or root) may register or unregister it.
fn check_owner(inner: &Inner, caller: Caller, target: &Target) -> Result<(), NspError> {
    let (_, id) = netns::of_pid(caller.pid, None).map_err(|e| NspError::Caller(e.to_string()))?;
    // Root on the node itself (an operator, a frontend) may register anything.
    if caller.uid == 0 && Some(id) == NetnsId::own() {
        return Ok(());
    }
    // As the registry keeps them: an address given twice is still its own.
    let ips = canonical(&target.ips);
    // Its own conduit addresses, and a stream of that conduit.
    let on_conduit = |c: &Connection| match &target.stream {
        Some(p) => p.trench == c.trench && p.conduit == c.conduit,
        None => true,
    };
    if inner
        .connections
        .iter()
        .any(|c| c.netns == id && c.local_ips() == ips && on_conduit(c))
    {
        Ok(())
    } else {
        Err(NspError::NotYours(target.ips.clone()))
    }
}

/// Enabled DEFAULT targets with a valid identifier whose ips are a conduit
/// connection on this node become local LB targets on that connection's veth.
fn lb_targets(inner: &Inner) -> Vec<TargetSpec> {
    let mut out = Vec::new();
    for t in inner.registry.targets() {
        let (Status::Enabled, Kind::Default, Some(path), Some(id)) =
            (t.status, t.kind, &t.stream, t.identifier())
        else {
            continue;
        };
        match inner.config.stream(path) {
            Some(s) if (1..=s.max_targets).contains(&id) => {}
            _ => continue,
        }
        let Some(c) = inner.connections.iter().find(|c| c.local_ips() == t.ips) else {
            tracing::debug!(ips = ?t.ips, "target is not on a conduit of this node; skipped");
            continue;
        };
        out.push(TargetSpec {
            stream: StreamPath::full_name(path),
            identifier: id,
            via: TargetVia::Local {
                interface: c.link.host_ifname.clone(),
                mac: crate::net::mac_text(c.link.peer_mac),
            },
        });
    }
    out
}

/// Why an ENABLED DEFAULT target of another node takes no traffic here
/// whatever its node does: this node's configuration has no such stream, or
/// a smaller `max_targets` (configurations differ during a rollout).
fn unusable_here(config: &NspConfig, r: &RemoteTarget) -> Option<String> {
    let t = &r.target;
    let (Status::Enabled, Kind::Default, Some(path)) = (t.status, t.kind, &t.stream) else {
        return None;
    };
    let Some(stream) = config.stream(path) else {
        return Some(format!(
            "stream {} is not configured on this node",
            path.full_name()
        ));
    };
    match t.identifier() {
        Some(id) if (1..=stream.max_targets).contains(&id) => None,
        _ => Some(format!(
            "identifier {:?} is not in 1..={} (max_targets of {} on this node)",
            t.context
                .get(crate::nsp::registry::IDENTIFIER)
                .map_or("", String::as_str),
            stream.max_targets,
            path.full_name()
        )),
    }
}

/// A target of another node as this node's watchers see it: DISABLED where
/// it takes no traffic here ([`unusable_here`]), as a local target above
/// `max_targets` is.
fn as_seen_here(config: &NspConfig, r: &RemoteTarget) -> RemoteTarget {
    let mut r = r.clone();
    if unusable_here(config, &r).is_some() {
        r.target.status = Status::Disabled;
    }
    r
}

/// ENABLED DEFAULT targets of other nodes that their node serves, through
/// the tunnel to that node; an identifier already taken (a partition let two
/// nodes enable it) keeps its first holder, in an order every node shares.
/// Returns the indices in `inner.remote` of those left out for that reason:
/// they take no traffic here, so watchers see them DISABLED.
fn remote_lb_targets(inner: &Inner, out: &mut Vec<TargetSpec>) -> Vec<usize> {
    let mut left_out = Vec::new();
    for (i, r) in inner.remote.iter().enumerate() {
        let t = &r.target;
        let (true, Some(address), Status::Enabled, Kind::Default, Some(path), Some(id)) = (
            r.served,
            r.address,
            t.status,
            t.kind,
            &t.stream,
            t.identifier(),
        ) else {
            continue;
        };
        match inner.config.stream(path) {
            Some(s) if (1..=s.max_targets).contains(&id) => {}
            _ => continue,
        }
        let stream = path.full_name();
        if out.iter().any(|o| o.stream == stream && o.identifier == id) {
            tracing::warn!(
                node = r.node,
                "identifier {id} of {stream} is taken; its target there is left out"
            );
            left_out.push(i);
            continue;
        }
        out.push(TargetSpec {
            stream,
            identifier: id,
            via: TargetVia::Remote {
                node: address.to_string(),
            },
        });
    }
    left_out
}

/// `ips` as the registry keeps them: each CIDR in its canonical form,
/// sorted, once (one that does not parse is kept as given, to be refused).
fn canonical(ips: &[String]) -> Vec<String> {
    let mut ips: Vec<String> = ips
        .iter()
        .map(|ip| {
            ip.parse::<Prefix>()
                .map_or_else(|_| ip.clone(), |p| p.to_string())
        })
        .collect();
    ips.sort();
    ips.dedup();
    ips
}

/// The registry key of a target as registered (ips normalised as the registry does).
fn registry_key(target: &Target) -> String {
    let mut t = target.clone();
    t.ips = canonical(&t.ips);
    t.key()
}

fn to_json(value: &Persisted) -> Vec<u8> {
    serde_json::to_vec_pretty(value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::{as_seen_here, canonical, remote_lb_targets, unusable_here, Inner, RemoteTarget};
    use crate::nsp::config::{NspConfig, StreamPath};
    use crate::nsp::registry::{Kind, Status, Target, IDENTIFIER};

    /// Another node's ENABLED target of stream `stream` with identifier `id`.
    fn remote(stream: &str, id: &str) -> RemoteTarget {
        RemoteTarget {
            node: "n9".into(),
            address: Some("198.51.100.9".parse().unwrap()),
            served: true,
            target: Target {
                ips: vec!["198.19.9.2/30".into()],
                context: [(IDENTIFIER.to_string(), id.to_string())].into(),
                status: Status::Enabled,
                kind: Kind::Default,
                stream: Some(StreamPath {
                    trench: "t".into(),
                    conduit: "c".into(),
                    stream: stream.into(),
                }),
            },
        }
    }

    /// Found by a tester: another node's target above this node's
    /// `max_targets`, or of a stream this node does not have, was listed
    /// ENABLED though it takes no traffic here.
    #[test]
    fn other_nodes_targets_that_take_no_traffic_here_are_listed_disabled() {
        let mut config: NspConfig = toml::from_str(
            "[[trenches]]\nname = \"t\"\n[[conduits]]\nname = \"c\"\n\
             [[streams]]\nname = \"s\"\nconduit = \"c\"\nmax_targets = 4\n",
        )
        .unwrap();
        config.fill_trenches();
        for (stream, id, usable) in [
            ("s", "1", true),
            ("s", "4", true),
            ("s", "5", false),
            ("s", "7", false),
            ("z", "2", false),
        ] {
            let r = remote(stream, id);
            assert_eq!(
                unusable_here(&config, &r).is_none(),
                usable,
                "{stream} {id}"
            );
            let want = if usable {
                Status::Enabled
            } else {
                Status::Disabled
            };
            assert_eq!(
                as_seen_here(&config, &r).target.status,
                want,
                "{stream} {id}"
            );
        }
        let why = unusable_here(&config, &remote("s", "7")).unwrap();
        assert!(why.contains("1..=4"), "{why}");
        let why = unusable_here(&config, &remote("z", "2")).unwrap();
        assert!(why.contains("not configured"), "{why}");
        // A DISABLED one stays as it is.
        let mut r = remote("s", "7");
        r.target.status = Status::Disabled;
        assert!(unusable_here(&config, &r).is_none());
    }

    /// Found by a review: when a partition let two nodes enable one
    /// identifier, the second holder took no traffic here and was listed ENABLED.
    #[test]
    fn a_remote_target_that_loses_its_identifier_is_left_out() {
        let mut config: NspConfig = toml::from_str(
            "[[trenches]]\nname = \"t\"\n[[conduits]]\nname = \"c\"\n\
             [[streams]]\nname = \"s\"\nconduit = \"c\"\nmax_targets = 4\n",
        )
        .unwrap();
        config.fill_trenches();
        let mut second = remote("s", "2");
        second.node = "n8".into();
        second.address = Some("198.51.100.8".parse().unwrap());
        let inner = Inner {
            config: std::sync::Arc::new(config),
            registry: crate::nsp::registry::Registry::new(std::time::Duration::from_secs(60)),
            connections: Vec::new(),
            next_link: 0,
            persisted: Vec::new(),
            remote: vec![remote("s", "1"), remote("s", "2"), second],
        };
        let mut out = Vec::new();
        assert_eq!(remote_lb_targets(&inner, &mut out), [2]);
        let held: Vec<_> = out
            .iter()
            .map(|t| (t.identifier, format!("{:?}", t.via)))
            .collect();
        assert_eq!(held.len(), 2);
        assert_eq!(held[0].0, 1);
        assert_eq!(held[1].0, 2);
        assert!(held[1].1.contains("198.51.100.9"), "{:?}", held[1]);
    }

    #[test]
    fn ips_compare_as_the_registry_keeps_them() {
        let given =
            |ips: &[&str]| canonical(&ips.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        // An owner naming its address twice, or in another order or form.
        assert_eq!(
            given(&["172.16.0.2/24", "fd00::2/64", "172.16.0.2/24"]),
            given(&["fd00:0::2/64", "172.16.0.2/24"])
        );
        assert_eq!(given(&["fd00:0::2/64"]), ["fd00::2/64"]);
        assert_eq!(
            given(&["nonsense", "172.16.0.2/24"]),
            ["172.16.0.2/24", "nonsense"]
        );
    }
}
