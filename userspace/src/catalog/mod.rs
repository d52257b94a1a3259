//! The service catalog: endpoint providers (today the xDS client; the
//! target registry and the VIP configuration are listed beside it) merged
//! into per-service backend sets that the LB maps get through one writer.
//!
//! An EDS cluster feeds one VIP: the catalog makes it a VIP, a stream and a
//! flow, each backend reachable on this node a local target, and each one
//! in another cluster node's published prefixes a remote target through
//! the tunnel to that node ([`resolve`]). Endpoint
//! weights become Maglev slots (a backend of weight w holds w of the
//! stream's identifiers, scaled when they add up to more, see [`slots`]), so real
//! traffic splits in their proportion; the stream has room for the next
//! power of two of them ([`stream_size`]). A backend's identifiers are keyed
//! by its address and port and kept across updates and restarts
//! ([`identity`]). Updates arriving within [`DEBOUNCE`] are written as one
//! map update; the xDS client's ACK waits for it.

pub mod identity;
pub mod resolve;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Mutex};

use crate::lb::flows::{FlowSpec, VipSpec};
use crate::lb::model::{LbSpec, StreamSpec, TargetSpec, TargetVia};
use crate::lb::service::LbService;
use crate::overlay::manager::{Feed, NetManager};
use crate::overlay::ManagerObserver;
use crate::xds::{ClusterEndpoints, EndpointSink, HealthStatus, SelectedEndpoint};
use identity::Identities;
use resolve::RemoteNode;

pub use plugin::CatalogPlugin;

mod plugin;

pub const LB_SOURCE: &str = "eds";
/// Where the identities are kept, in the state directory.
pub const STATE_FILE: &str = "eds-identities.json";
/// Where the endpoints of the last accepted write are kept, in the state
/// directory: what a restart writes before the server answers.
pub const ENDPOINTS_FILE: &str = "eds-endpoints.json";
/// Maglev slots one EDS service's backends share at least when their
/// weights need more (see [`slots`]).
pub const MAX_SLOTS: u32 = 100;
/// Slots per backend an EDS service may take when its weights need more
/// than [`MAX_SLOTS`] (see [`slots`]).
pub const SLOTS_PER_BACKEND: u64 = 4;
/// Updates within this of the first of a burst become one map write (the
/// timer rounds it up to the next millisecond), and so do updates that come
/// while the backends are being resolved.
pub const DEBOUNCE: Duration = Duration::from_millis(1);
/// How often the backends the last write left out are looked at again:
/// the kernel is asked to resolve those on a directly connected network,
/// and the catalog writes again once one of them resolved.
pub const UNRESOLVED_RETRY: Duration = Duration::from_secs(1);

pub use crate::config::ClusterBinding;

/// The accepted endpoints of each cluster, shared (not copied) by the
/// writer's snapshots and what the maps hold.
pub type Clusters = BTreeMap<String, Arc<ClusterEndpoints>>;

/// One backend of a service, as the catalog lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    pub address: std::net::IpAddr,
    pub port: u16,
    pub weight: u32,
    pub priority: u32,
    pub locality: String,
    /// Maglev slots it holds in the maps; 0 when it has none.
    pub slots: u32,
    /// Why it has no slots: "unreachable" (the dataplane cannot reach it
    /// from this node), "standby" (a lower priority), or its health; for
    /// one with slots on another cluster node, "on node <name>".
    pub note: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub source: &'static str,
    pub vip: String,
    pub backends: Vec<Backend>,
}

struct State {
    bindings: BTreeMap<String, ClusterBinding>,
    /// The last accepted endpoints of each cluster.
    clusters: Clusters,
    /// Bumped by every update; `written` follows once the maps hold it.
    wanted: u64,
    /// Each backend's Maglev identifiers.
    identities: Identities,
    /// Where `identities` are saved (none: not kept).
    state_file: Option<PathBuf>,
    /// The cluster's other nodes (empty without `[cluster]`).
    nodes: Vec<RemoteNode>,
    /// Clusters taken from [`ENDPOINTS_FILE`] at the start, not yet written.
    restored: BTreeSet<String>,
}

/// What a write starts from.
struct Snapshot {
    generation: u64,
    spec: LbSpec,
    clusters: Clusters,
    slots: BTreeMap<String, BTreeMap<SocketAddr, u32>>,
    nodes: Vec<RemoteNode>,
    /// The identities before this write assigned its own, when asked for:
    /// what a refused write leaves if no write was accepted yet.
    before: Option<Identities>,
}

/// What the last successful write put into the maps.
#[derive(Default)]
struct Written {
    clusters: Clusters,
    /// Backends (addresses) left out because this node cannot reach them.
    unreachable: BTreeMap<String, BTreeSet<IpAddr>>,
    /// Identifiers in the maps per backend.
    slots: BTreeMap<String, BTreeMap<SocketAddr, u32>>,
    /// Backends reached through another node, with its name.
    remote: BTreeMap<IpAddr, String>,
    /// The identifiers each backend holds in the maps.
    identities: Arc<Identities>,
}

pub struct Catalog {
    lb: Arc<LbService>,
    /// The NetManager, once it runs: it gets the service-IP bindings' members.
    overlay: std::sync::Mutex<Option<Arc<NetManager>>>,
    state: Mutex<State>,
    written: watch::Sender<(u64, Result<(), String>)>,
    kick: tokio::sync::Notify,
    /// The identities and endpoints of the last write the LB accepted (when
    /// they are kept on disk) and its generation, for [`persist`].
    to_save: watch::Sender<(u64, Arc<Identities>, Clusters)>,
    /// The generation whose identities [`persist`] last handled.
    saved: watch::Sender<u64>,
    /// What the last successful write holds, for [`serve`] and the listing.
    accepted: watch::Sender<Arc<Written>>,
    /// The assignments of the last successful write (what the EDS server serves).
    served: watch::Sender<crate::xds::Assignments>,
}

impl Catalog {
    /// The LB it writes into.
    pub fn lb(&self) -> &Arc<LbService> {
        &self.lb
    }

    pub fn new(lb: Arc<LbService>) -> Arc<Self> {
        let catalog = Arc::new(Self {
            lb,
            overlay: std::sync::Mutex::new(None),
            state: Mutex::new(State {
                bindings: BTreeMap::new(),
                clusters: BTreeMap::new(),
                wanted: 0,
                identities: Identities::default(),
                state_file: None,
                nodes: Vec::new(),
                restored: BTreeSet::new(),
            }),
            written: watch::channel((0, Ok(()))).0,
            kick: tokio::sync::Notify::new(),
            to_save: watch::channel((0, Arc::default(), Clusters::new())).0,
            saved: watch::channel(0).0,
            accepted: watch::channel(Arc::default()).0,
            served: watch::channel(crate::xds::Assignments::default()).0,
        });
        tokio::spawn(writer(catalog.clone()));
        tokio::spawn(serve(catalog.clone()));
        tokio::spawn(persist(catalog.clone(), catalog.to_save.subscribe()));
        catalog
    }

    /// The cluster's nodes changed: backends in other nodes' prefixes are
    /// resolved again.
    pub async fn set_nodes(&self, nodes: Vec<RemoteNode>) {
        let mut state = self.state.lock().await;
        if state.nodes != nodes {
            state.nodes = nodes;
            state.wanted += 1;
            self.kick.notify_one();
        }
    }

    /// Which VIP each EDS cluster feeds (from the configuration).
    pub async fn set_bindings(&self, bindings: Vec<ClusterBinding>) {
        let mut state = self.state.lock().await;
        state.bindings = bindings.into_iter().map(|b| (b.name.clone(), b)).collect();
        let State {
            bindings,
            identities,
            ..
        } = &mut *state;
        identities.retain(|c| bindings.get(c).is_some_and(|b| !b.vip.is_empty()));
    }

    /// Keeps the backends' identifiers in `dir` ([`STATE_FILE`]) and takes
    /// back the ones saved there.
    pub async fn set_state_dir(&self, dir: &std::path::Path) -> Result<(), String> {
        let path = dir.join(STATE_FILE);
        let identities = match std::fs::read(&path) {
            // As the other state files: one that cannot be read is set
            // aside and the daemon starts (the backends get new
            // identifiers), rather than a node not starting at all.
            Ok(bytes) => serde_json::from_slice::<Identities>(&bytes).unwrap_or_else(|e| {
                tracing::warn!("EDS identities {}", crate::statefile::refused(&path, &e));
                Identities::default()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Identities::default(),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let mut state = self.state.lock().await;
        state.identities = identities;
        let State {
            bindings,
            identities,
            ..
        } = &mut *state;
        identities.retain(|c| bindings.get(c).is_some_and(|b| !b.vip.is_empty()));
        state.state_file = Some(path);
        // A cache of what the maps held: one that cannot be read is not
        // used (the server's next answer replaces it anyway).
        let kept = dir.join(ENDPOINTS_FILE);
        let restored = match std::fs::read(&kept) {
            Ok(bytes) => serde_json::from_slice::<Vec<ClusterEndpoints>>(&bytes)
                .inspect_err(|e| tracing::warn!("{}: {e}; not used", kept.display()))
                .unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        for c in restored {
            if state.bindings.contains_key(&c.cluster) && !state.clusters.contains_key(&c.cluster) {
                state.restored.insert(c.cluster.clone());
                state.clusters.insert(c.cluster.clone(), Arc::new(c));
            }
        }
        Ok(())
    }

    /// Writes the endpoints kept from before the restart, before the xDS
    /// client starts: a kept dataplane goes on with them until the server
    /// answers. Refused (a backend no longer valid here), they are dropped.
    pub async fn write_restored(&self) {
        let mine = {
            let mut state = self.state.lock().await;
            if state.restored.is_empty() {
                return;
            }
            state.wanted += 1;
            state.wanted
        };
        self.kick.notify_one();
        let mut written = self.written.subscribe();
        let result = written
            .wait_for(|(generation, _)| *generation >= mine)
            .await
            .map_err(|_| "the catalog writer stopped".to_string())
            .and_then(|w| w.1.clone());
        let mut state = self.state.lock().await;
        match result {
            Ok(()) => tracing::info!(
                "EDS endpoints kept from before the restart written for {:?}",
                state.restored
            ),
            Err(e) => {
                tracing::warn!("EDS endpoints kept from before the restart not written: {e}");
                for cluster in std::mem::take(&mut state.restored) {
                    state.clusters.remove(&cluster);
                }
                state.wanted += 1;
                drop(state);
                self.kick.notify_one();
            }
        }
    }

    fn overlay(&self) -> Option<Arc<NetManager>> {
        self.overlay.lock().expect("lock").clone()
    }

    /// The EDS backend (`address:port`) behind each LB target the catalog
    /// wrote, by target name (`eds.<cluster>/<identifier>`), for metrics.
    pub fn target_endpoints(&self) -> HashMap<String, String> {
        let written = self.accepted.borrow();
        let mut out = HashMap::new();
        for (cluster, backends) in &written.identities.clusters {
            for (address, ids) in backends {
                for id in ids {
                    out.insert(format!("eds.{cluster}/{id}"), address.to_string());
                }
            }
        }
        out
    }

    /// The services of every provider: EDS clusters with their backends,
    /// the streams the target registry and the LB configuration feed, and
    /// the NetManager's service IPs (deployments and other nodes' tables).
    pub async fn services(&self) -> Vec<Service> {
        let built = {
            let state = self.state.lock().await;
            listing(&state, &self.accepted.borrow())
        };
        let mut services = built;
        if let Some(nm) = self.overlay() {
            for s in nm.listing().await {
                if s.fed {
                    continue; // listed with its EDS cluster
                }
                services.push(Service {
                    name: format!("{} {}", s.address, s.ip_type.name()),
                    source: "netmanager",
                    vip: s.address.to_string(),
                    backends: s
                        .members
                        .iter()
                        .map(|m| Backend {
                            address: std::net::IpAddr::V4(m.ns_addr),
                            port: 0,
                            weight: m.weight,
                            priority: 0,
                            locality: m.location.clone(),
                            slots: 0,
                            note: String::new(),
                        })
                        .collect(),
                });
            }
        }
        for (source, spec) in self.lb.sources().await {
            if source == LB_SOURCE {
                continue;
            }
            for stream in &spec.streams {
                let backends = spec
                    .targets
                    .iter()
                    .filter(|t| t.stream == stream.name)
                    .map(|t| Backend {
                        address: std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
                        port: 0,
                        weight: 1,
                        priority: 0,
                        locality: String::new(),
                        slots: 1,
                        note: match &t.via {
                            TargetVia::Local { interface, mac } => {
                                format!("identifier {} on {interface} ({mac})", t.identifier)
                            }
                            TargetVia::Remote { node } => {
                                format!("identifier {} on node {node}", t.identifier)
                            }
                        },
                    })
                    .collect();
                services.push(Service {
                    name: stream.name.clone(),
                    source: if source == "nsp" { "registry" } else { source },
                    vip: spec
                        .flows
                        .iter()
                        .filter(|f| f.stream == stream.name)
                        .flat_map(|f| f.vips.iter().cloned())
                        .collect::<Vec<_>>()
                        .join(","),
                    backends,
                });
            }
        }
        services
    }

    /// The update count, the LB part (backends unresolved), the clusters
    /// and the identifiers each backend holds, as of now; none when nothing
    /// changed since generation `last` (identities assigned for a write that
    /// does not happen would drift from what the maps hold). `keep_before`:
    /// also a copy of the identities before this assignment; `reset`: the
    /// identities to assign from (the round's first snapshot assigned some
    /// that were never written).
    async fn snapshot(
        &self,
        last: u64,
        keep_before: bool,
        reset: Option<&Identities>,
    ) -> Option<Snapshot> {
        let mut state = self.state.lock().await;
        if state.wanted == last {
            return None;
        }
        if let Some(reset) = reset {
            let State {
                bindings,
                identities,
                ..
            } = &mut *state;
            *identities = reset.clone();
            identities.retain(|c| bindings.get(c).is_some_and(|b| !b.vip.is_empty()));
        }
        let before = keep_before.then(|| state.identities.clone());
        let spec = lb_part(&mut state);
        let slots = state
            .identities
            .clusters
            .iter()
            .map(|(c, backends)| {
                let counts = backends.iter().map(|(a, ids)| (*a, ids.len() as u32));
                (c.clone(), counts.collect())
            })
            .collect();
        Some(Snapshot {
            generation: state.wanted,
            spec,
            clusters: state.clusters.clone(),
            slots,
            nodes: state.nodes.clone(),
            before,
        })
    }

    /// Waits (at most `timeout`) until the identities of the last successful
    /// write are saved: a stop right after an ACK keeps them.
    pub async fn saved(&self, timeout: std::time::Duration) {
        let last = self.to_save.borrow().0;
        let mut saved = self.saved.subscribe();
        let _ = tokio::time::timeout(timeout, saved.wait_for(|&g| g >= last)).await;
    }

    /// The EDS services as the EDS server serves them, by cluster name:
    /// one `ClusterLoadAssignment` per cluster whose endpoints the maps
    /// hold (updated after each successful write, never with refused
    /// endpoints).
    pub fn watch_loads(&self) -> watch::Receiver<crate::xds::Assignments> {
        let loads = self.served.subscribe();
        // [`serve`] builds them only while someone watches: now, for this one.
        self.accepted.send_modify(|_| {});
        loads
    }
}

#[async_trait::async_trait]
impl ManagerObserver for Catalog {
    /// Hands the service-IP bindings to the NetManager (now and after every
    /// update), and lists its service IPs with the other providers'.
    async fn set_manager(&self, overlay: Option<Arc<NetManager>>) {
        *self.overlay.lock().expect("lock") = overlay;
        self.state.lock().await.wanted += 1;
        self.kick.notify_one();
    }
}

#[async_trait::async_trait]
impl EndpointSink for Catalog {
    async fn held(&self) -> Vec<ClusterEndpoints> {
        let state = self.state.lock().await;
        state
            .restored
            .iter()
            .filter_map(|c| state.clusters.get(c))
            .map(|c| (**c).clone())
            .collect()
    }

    /// Returns once the maps hold this update (or a later one).
    async fn apply(&self, update: ClusterEndpoints) -> Result<(), String> {
        self.apply_all(vec![update]).await
    }

    /// One write for all of them: refused, none of them stays.
    async fn apply_all(&self, updates: Vec<ClusterEndpoints>) -> Result<(), String> {
        // Said once per new policy: servers resend assignments often.
        let drops: Vec<(String, String)> = {
            let state = self.state.lock().await;
            updates
                .iter()
                .filter(|u| {
                    !u.drop_overloads.is_empty()
                        && state
                            .clusters
                            .get(&u.cluster)
                            .is_none_or(|old| old.drop_overloads != u.drop_overloads)
                })
                .map(|u| {
                    let list: Vec<String> = u
                        .drop_overloads
                        .iter()
                        .map(|d| format!("{} {} ppm", d.category, d.parts_per_million))
                        .collect();
                    (u.cluster.clone(), list.join(", "))
                })
                .collect()
        };
        let (mine, previous) = {
            let mut state = self.state.lock().await;
            if let Some(u) = updates
                .iter()
                .find(|u| !state.bindings.contains_key(&u.cluster))
            {
                return Err(format!(
                    "cluster {:?} is not bound to a VIP or service IP",
                    u.cluster
                ));
            }
            let previous: Vec<(String, Option<Arc<ClusterEndpoints>>)> = updates
                .into_iter()
                .map(|u| {
                    let cluster = u.cluster.clone();
                    let old = state.clusters.insert(cluster.clone(), Arc::new(u));
                    (cluster, old)
                })
                .collect();
            state.wanted += 1;
            (state.wanted, previous)
        };
        self.kick.notify_one();
        let mut written = self.written.subscribe();
        let result = written
            .wait_for(|(generation, _)| *generation >= mine)
            .await
            .map_err(|_| "the catalog writer stopped".to_string())?
            .1
            .clone();
        if result.is_err() {
            // Refused (NACK): the last good endpoints stay what the catalog
            // holds, and are written again (a write meanwhile may have
            // taken the refused ones).
            let mut state = self.state.lock().await;
            for (cluster, old) in previous.into_iter().rev() {
                match old {
                    Some(p) => state.clusters.insert(cluster, p),
                    None => state.clusters.remove(&cluster),
                };
            }
            state.wanted += 1;
            drop(state);
            self.kick.notify_one();
        } else {
            for (cluster, drops) in drops {
                // Envoy drops a share of requests; this dataplane balances
                // flows, and dropping a share of them is not that policy.
                tracing::warn!(
                    %cluster,
                    "drop_overloads ({drops}) are served to proxies (xds.serve) but not applied: this node's load balancer drops no share of the traffic"
                );
            }
        }
        result
    }
}

/// Writes the LB part "eds" whenever something changed, a burst at a time:
/// updates within [`DEBOUNCE`] of the first become one write. The backends
/// are resolved while the window runs, and again at its end if more came.
async fn writer(catalog: Arc<Catalog>) {
    let mut last = 0;
    // The identities of the last write the LB accepted: what a refused one
    // gives back (the maps keep the identifiers they hold).
    let mut last_good: Option<Arc<Identities>> = None;
    // Left-out backends found usable since (each forces one write: one
    // usable on another interface than its route's stays out), and where
    // the next round of asking starts.
    let mut found: BTreeSet<IpAddr> = BTreeSet::new();
    let mut ask_from = 0;
    loop {
        let unresolved: BTreeSet<IpAddr> = catalog
            .accepted
            .borrow()
            .unreachable
            .values()
            .flatten()
            .copied()
            .collect();
        found.retain(|a| unresolved.contains(a));
        tokio::select! {
            _ = catalog.kick.notified() => {}
            _ = tokio::time::sleep(UNRESOLVED_RETRY), if !unresolved.is_empty() => {
                // Asked again each time (a solicitation can fail), and
                // written again only once one of them resolved.
                let from = ask_from;
                ask_from += resolve::ASK_AT_ONCE;
                let usable = tokio::task::spawn_blocking(move || {
                    let mut list: Vec<IpAddr> = unresolved.iter().copied().collect();
                    let start = from % list.len();
                    list.rotate_left(start);
                    resolve::ask_neighbours(&list);
                    resolve::usable(&unresolved)
                })
                .await
                .unwrap_or_default();
                if usable.is_subset(&found) {
                    continue;
                }
                found.extend(usable);
                catalog.state.lock().await.wanted += 1;
            }
        }
        // A kick for updates the last write already held writes nothing.
        let Some(Snapshot {
            mut generation,
            mut spec,
            mut clusters,
            mut slots,
            mut nodes,
            before,
        }) = catalog.snapshot(last, last_good.is_none(), None).await
        else {
            continue;
        };
        let (_, mut resolved) = tokio::join!(
            tokio::time::sleep(DEBOUNCE),
            resolve::targets(&mut spec, &nodes)
        );
        if catalog.state.lock().await.wanted != generation {
            // What this round assigned first was never written: assign
            // again from what the maps hold.
            let held = last_good.as_deref().or(before.as_ref());
            if let Some(again) = catalog.snapshot(last, false, held).await {
                Snapshot {
                    generation,
                    spec,
                    clusters,
                    slots,
                    nodes,
                    before: _,
                } = again;
                resolved = resolve::targets(&mut spec, &nodes).await;
            }
        }
        last = generation;
        // What this write replaces, freed after it is answered.
        let mut garbage: Vec<Box<dyn Send>> = Vec::new();
        let feed = overlay_part(&*catalog.state.lock().await);
        // A feed the overlay would refuse (a service IP inside a VIP)
        // refuses the whole write, before the LB part changes anything.
        let refused = match catalog.overlay() {
            Some(nm) if !feed.is_empty() => nm.check_feed(&feed).await.err(),
            _ => None,
        };
        let (result, replaced, stopped) = match refused {
            None => {
                let (result, replaced) = catalog.lb.set_source_freeing_later(LB_SOURCE, spec).await;
                // The dataplane stops last; a write kicked on the way down
                // (the NetManager leaving) finds it stopped. Nothing is
                // lost: no error.
                let stopped = matches!(
                    result,
                    Err(crate::lb::service::LbServiceError::Dataplane(
                        crate::dataplane::DataplaneError::NotRunning
                    ))
                );
                (result.map_err(|e| e.to_string()), replaced, stopped)
            }
            Some(e) => (
                Err(format!("overlay: {e}")),
                Box::new(spec) as Box<dyn Send>,
                false,
            ),
        };
        let mut result = result;
        garbage.push(replaced);
        let mut accepted_ids = Arc::default();
        {
            let mut state = catalog.state.lock().await;
            let State {
                bindings,
                identities,
                state_file,
                ..
            } = &mut *state;
            if result.is_ok() {
                let held = Arc::new(identities.clone());
                // Off this loop: neither the ACK nor the next write waits for
                // the disk. Handed over before the ACK, so a stop after it
                // waits for the save.
                if state_file.is_some() {
                    let old =
                        catalog
                            .to_save
                            .send_replace((generation, held.clone(), clusters.clone()));
                    garbage.push(Box::new(old));
                }
                garbage.push(Box::new(last_good.replace(held.clone())));
                accepted_ids = held;
            } else {
                // `before` is kept while no write was accepted.
                if let Some(held) = last_good.as_deref().cloned().or(before) {
                    *identities = held;
                }
                identities.retain(|c| bindings.get(c).is_some_and(|b| !b.vip.is_empty()));
            }
        }
        if let (Ok(()), Some(nm)) = (&result, catalog.overlay()) {
            result = nm.set_feed(feed).await.map_err(|e| e.to_string());
        }
        match &result {
            Ok(()) => {
                let old = catalog.accepted.send_replace(Arc::new(Written {
                    clusters,
                    unreachable: resolved.unreachable,
                    slots,
                    remote: resolved.remote,
                    identities: accepted_ids,
                }));
                garbage.push(Box::new(old));
            }
            Err(e) if stopped => tracing::debug!("EDS endpoints not written: {e}"),
            Err(e) => tracing::error!("EDS endpoints not written: {e}"),
        }
        let _ = catalog.written.send_replace((generation, result));
        // Freed once the update is answered (10 000 endpoints take about 1 ms).
        drop(garbage);
    }
}

/// Saves the identities of each successful write, the latest when writes
/// come faster than the disk. The last saved set is kept, so an unchanged
/// one costs a comparison (a file removed meanwhile is written again at the
/// next change).
async fn persist(
    catalog: Arc<Catalog>,
    mut to_save: watch::Receiver<(u64, Arc<Identities>, Clusters)>,
) {
    let mut saved: Option<(PathBuf, Arc<Identities>)> = None;
    let mut saved_endpoints: Option<Clusters> = None;
    while to_save.changed().await.is_ok() {
        let (generation, identities, clusters) = to_save.borrow_and_update().clone();
        let same = |a: &Clusters, b: &Clusters| {
            a.len() == b.len()
                && a.iter()
                    .zip(b)
                    .all(|((n, c), (m, d))| n == m && (Arc::ptr_eq(c, d) || c == d))
        };
        let kept = catalog
            .state
            .lock()
            .await
            .state_file
            .as_ref()
            .map(|p| p.with_file_name(ENDPOINTS_FILE));
        if let Some(kept) =
            kept.filter(|_| !saved_endpoints.as_ref().is_some_and(|s| same(s, &clusters)))
        {
            let all = clusters.clone();
            let result = tokio::task::spawn_blocking(move || {
                let list: Vec<&ClusterEndpoints> = all.values().map(|c| &**c).collect();
                crate::statefile::save(&kept, &list)
                    .map_err(|e| format!("saving {}: {e}", kept.display()))
            })
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
            saved_endpoints = match result {
                Ok(()) => Some(clusters),
                Err(e) => {
                    tracing::warn!("EDS endpoints not saved: {e}");
                    None
                }
            };
        }
        let path = catalog.state.lock().await.state_file.clone();
        let unchanged = |p: &PathBuf| {
            saved
                .as_ref()
                .is_some_and(|(q, ids)| q == p && **ids == *identities)
        };
        if let Some(path) = path.filter(|p| !unchanged(p)) {
            let first = saved.as_ref().is_none_or(|(q, _)| *q != path);
            let ids = identities.clone();
            let result = tokio::task::spawn_blocking(move || {
                // After a restart, the file may already hold them.
                let on_disk = first
                    && std::fs::read(&path)
                        .ok()
                        .and_then(|b| serde_json::from_slice::<Identities>(&b).ok())
                        .is_some_and(|old| old == *ids);
                if on_disk {
                    return Ok(path);
                }
                crate::statefile::save(&path, &*ids)
                    .map(|()| path.clone())
                    .map_err(|e| format!("saving {}: {e}", path.display()))
            })
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
            saved = match result {
                Ok(path) => Some((path, identities)),
                Err(e) => {
                    tracing::warn!("EDS backend identities not saved: {e}");
                    None
                }
            };
        }
        catalog.saved.send_replace(generation);
    }
}

/// Turns what the maps hold into what the EDS server serves, off the
/// writer's path (encoding thousands of endpoints takes a while).
async fn serve(catalog: Arc<Catalog>) {
    let mut accepted = catalog.accepted.subscribe();
    while accepted.changed().await.is_ok() {
        let written = accepted.borrow_and_update().clone();
        // Only for an EDS server (`xds.serve`): building them costs about
        // 4 ms of CPU at 10 000 endpoints, which updates should not pay.
        if catalog.served.receiver_count() == 0 {
            continue;
        }
        let none = BTreeSet::new();
        let loads: BTreeMap<_, _> = written
            .clusters
            .values()
            .map(|c| {
                let unreachable = written.unreachable.get(&c.cluster).unwrap_or(&none);
                (c.cluster.clone(), crate::xds::assignment(c, unreachable))
            })
            .collect();
        catalog.served.send_if_modified(|served| {
            let changed = **served != loads;
            if changed {
                *served = Arc::new(loads);
            }
            changed
        });
    }
}

/// Each `[[xds.clusters]]` as the catalog will use it: a name of its own,
/// exactly one of a VIP (with protocols and ports a flow takes) and an IPv4
/// service IP. The daemon and `tapmesh config check` both ask it.
pub fn check_bindings(clusters: &[ClusterBinding]) -> Result<(), String> {
    use crate::lb::flows::{FlowSet, FlowSpec, VipSpec};
    let mut seen = std::collections::HashSet::new();
    let mut vips = Vec::new();
    for c in clusters {
        let bad = |message: String| format!("xds.clusters: cluster {:?}: {message}", c.name);
        crate::names::validate_name("xds cluster name", &c.name).map_err(|e| bad(e.to_string()))?;
        if !seen.insert(c.name.as_str()) {
            return Err(bad("is named twice".into()));
        }
        match (c.vip.is_empty(), c.service_ip.is_empty()) {
            (false, true) => {
                let name = format!("eds.{}", c.name);
                let vip = VipSpec {
                    name: name.clone(),
                    address: c.vip.clone(),
                };
                let flow = FlowSpec {
                    name: name.clone(),
                    protocols: c.protocols.clone(),
                    destination_port_ranges: c.ports.clone(),
                    stream: name.clone(),
                    vips: vec![name],
                    ..Default::default()
                };
                FlowSet::parse(std::slice::from_ref(&vip), &[flow])
                    .map_err(|e| bad(e.to_string()))?;
                vips.push(vip);
            }
            (true, false) if c.service_ip.parse::<std::net::Ipv4Addr>().is_ok() => {}
            (true, false) => {
                return Err(bad(format!(
                    "service_ip {:?} is not an IPv4 address",
                    c.service_ip
                )))
            }
            _ => return Err(bad("set exactly one of vip and service_ip".into())),
        }
    }
    // A service IP inside a VIP: the uplink would balance what the overlay
    // translates (one inside another source's VIP is refused at each write).
    for c in clusters.iter().filter(|c| !c.service_ip.is_empty()) {
        let Ok(ip) = c.service_ip.parse::<std::net::Ipv4Addr>() else {
            continue;
        };
        let mapped = std::net::IpAddr::V6(ip.to_ipv6_mapped());
        let holder = vips.iter().find(|v| {
            crate::lb::flows::Vip::parse(v).is_ok_and(|p| !p.v6 && p.prefix.contains(mapped))
        });
        if let Some(v) = holder {
            return Err(format!(
                "xds.clusters: cluster {:?}: service_ip {ip} lies inside vip {} of cluster {:?}",
                c.name,
                v.address,
                v.name.trim_start_matches("eds.")
            ));
        }
    }
    // One address, one VIP: two clusters on one address never get written.
    let spec = crate::lb::model::LbSpec {
        vips,
        ..Default::default()
    };
    crate::lb::checks::check_owners(&[("eds", &spec)]).map_err(|e| format!("xds.clusters: {e}"))
}

/// A cluster's endpoints and the Maglev slots each should hold.
fn endpoints<'a>(clusters: &'a Clusters, cluster: &str) -> (&'a [SelectedEndpoint], Vec<u32>) {
    let endpoints = clusters
        .get(cluster)
        .map_or(&[][..], |c| c.endpoints.as_slice());
    let slots = slots(&endpoints.iter().map(|e| e.weight).collect::<Vec<_>>());
    (endpoints, slots)
}

fn lb_part(state: &mut State) -> LbSpec {
    eds_part(&state.bindings, &state.clusters, &mut state.identities)
}

/// The LB part for the EDS services (targets still unresolved: their
/// `via` names the backend address), with each backend's identifiers.
/// Pure: what the clusters' accepted endpoints become. A cluster with no
/// update yet is left out (its VIP is not taken, its saved identifiers are
/// kept for the first update); the xDS client applies one that never comes
/// as empty after `missing_after`.
pub fn eds_part(
    bindings: &BTreeMap<String, ClusterBinding>,
    clusters: &Clusters,
    identities: &mut Identities,
) -> LbSpec {
    let mut spec = LbSpec::default();
    let bound = bindings
        .iter()
        .filter(|(name, b)| !b.vip.is_empty() && clusters.contains_key(*name));
    for (name, binding) in bound {
        let lb_name = format!("eds.{name}");
        let (endpoints, slots) = endpoints(clusters, name);
        let wanted: Vec<(SocketAddr, u32)> = endpoints
            .iter()
            .zip(&slots)
            .map(|(e, n)| (SocketAddr::new(e.address, e.port), *n))
            .collect();
        let ids = identities.assign(name, &wanted);
        let total: u32 = slots.iter().sum();
        let highest = ids
            .iter()
            .flat_map(|i| i.iter())
            .copied()
            .max()
            .unwrap_or(0);
        spec.vips.push(VipSpec {
            name: lb_name.clone(),
            address: binding.vip.clone(),
        });
        spec.streams.push(StreamSpec {
            name: lb_name.clone(),
            max_targets: stream_size(total.max(highest)),
            table_size: None,
            port_nats: Vec::new(),
        });
        spec.flows.push(FlowSpec {
            name: lb_name.clone(),
            protocols: binding.protocols.clone(),
            destination_port_ranges: binding.ports.clone(),
            stream: lb_name.clone(),
            vips: vec![lb_name.clone()],
            ..Default::default()
        });
        for (e, ids) in endpoints.iter().zip(ids) {
            let node = crate::net::address_text(e.address);
            for &identifier in ids {
                spec.targets.push(TargetSpec {
                    stream: lb_name.clone(),
                    identifier,
                    // Resolved to an interface and MAC by `resolve::targets`.
                    via: TargetVia::Remote { node: node.clone() },
                });
            }
        }
    }
    spec
}

/// The NetManager's part: each service-IP binding's endpoints (IPv4) and weights.
fn overlay_part(state: &State) -> Feed {
    let mut feed = Feed::new();
    for (name, binding) in &state.bindings {
        let Ok(service_ip) = binding.service_ip.parse::<std::net::Ipv4Addr>() else {
            continue;
        };
        let members = feed.entry(service_ip).or_default();
        for e in endpoints(&state.clusters, name).0 {
            if let std::net::IpAddr::V4(a) = e.address {
                members.insert(a, e.weight.max(1));
            }
        }
    }
    feed
}

/// The EDS services as the catalog lists them: every endpoint of what the
/// maps hold, with its slots there or why it has none.
fn listing(state: &State, written: &Written) -> Vec<Service> {
    let mut services = Vec::new();
    let none = BTreeSet::new();
    let no_slots = BTreeMap::new();
    for (name, binding) in &state.bindings {
        let unreachable = written.unreachable.get(name).unwrap_or(&none);
        let slots = written.slots.get(name).unwrap_or(&no_slots);
        let backend = |e: &SelectedEndpoint, slots: u32, note: String| Backend {
            address: e.address,
            port: e.port,
            weight: e.weight,
            priority: e.priority,
            locality: [&e.locality.region, &e.locality.zone, &e.locality.sub_zone]
                .iter()
                .filter(|s| !s.is_empty())
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("/"),
            slots,
            note,
        };
        let mut backends = Vec::new();
        if let Some(c) = written.clusters.get(name) {
            for e in &c.endpoints {
                let held = slots
                    .get(&SocketAddr::new(e.address, e.port))
                    .copied()
                    .unwrap_or(0);
                let mut b = if binding.vip.is_empty() {
                    backend(e, 0, "member".into())
                } else if unreachable.contains(&e.address) {
                    backend(e, 0, "unreachable".into())
                } else if let Some(node) = written.remote.get(&e.address) {
                    backend(e, held, format!("on node {node}"))
                } else {
                    backend(e, held, String::new())
                };
                // Chosen because no endpoint of the cluster is healthy.
                if e.health == HealthStatus::Degraded as i32 {
                    b.note = [b.note.as_str(), "DEGRADED"].join(" ").trim().to_string();
                }
                backends.push(b);
            }
            for s in &c.standby {
                let note = match HealthStatus::try_from(s.endpoint.health) {
                    _ if s.usable => "standby".to_string(),
                    Ok(HealthStatus::Healthy | HealthStatus::Unknown) => {
                        "locality without weight".to_string()
                    }
                    Ok(h) => h.as_str_name().to_string(),
                    Err(_) => format!("health {}", s.endpoint.health),
                };
                backends.push(backend(&s.endpoint, 0, note));
            }
        }
        services.push(Service {
            name: name.clone(),
            source: "eds",
            vip: if binding.vip.is_empty() {
                format!("service IP {}", binding.service_ip)
            } else {
                binding.vip.clone()
            },
            backends,
        });
    }
    services
}

/// The `max_targets` of an EDS stream whose backends hold `slots` slots:
/// the next power of two (at most the Maglev limit), so a backend more or
/// less rarely changes the table's size, which would rewrite all of it.
pub fn stream_size(slots: u32) -> u32 {
    let rounded = slots.max(1).checked_next_power_of_two().unwrap_or(u32::MAX);
    rounded
        .min(crate::lb::maglev::MAX_STREAM_TARGETS)
        .max(slots)
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Maglev slots per weight (in lowest terms), in proportion, at least one each. The slots
/// in all: the weights' sum if it is at most [`MAX_SLOTS`] or
/// [`SLOTS_PER_BACKEND`] per backend (exact then), else the larger of the
/// two, within the Maglev limit. A backend whose share is under one slot
/// gets one; the others share the rest by weight (largest remainders get
/// the rounding), so a few heavy backends among many light ones keep their
/// share (with the slots capped at 100, one of weight 100 among 100 of
/// weight 1 held a third of the table, not half).
pub fn slots(weights: &[u32]) -> Vec<u32> {
    let n = weights.len() as u64;
    // In lowest terms: equal weights take one slot each, whatever their size.
    let weights: Vec<u64> = weights.iter().map(|&w| u64::from(w.max(1))).collect();
    let common = weights.iter().fold(0, |g, &w| gcd(g, w)).max(1);
    let weights: Vec<u64> = weights.iter().map(|&w| w / common).collect();
    let sum: u64 = weights.iter().sum();
    let limit = u64::from(crate::lb::maglev::MAX_STREAM_TARGETS);
    let budget = sum
        .min(SLOTS_PER_BACKEND * n)
        .min(limit)
        .max(u64::from(MAX_SLOTS))
        .max(n);
    if sum <= budget {
        return weights.iter().map(|&w| w as u32).collect();
    }
    // Fix at one slot every backend whose share of what is left is under
    // one, until none is: the largest always has one (budget >= n).
    let mut fixed = vec![false; weights.len()];
    loop {
        let free = budget - fixed.iter().filter(|&&f| f).count() as u64;
        let free_sum: u64 = (0..weights.len())
            .filter(|&i| !fixed[i])
            .map(|i| weights[i])
            .sum();
        let mut changed = false;
        for i in 0..weights.len() {
            if !fixed[i] && weights[i] * free < free_sum {
                fixed[i] = true;
                changed = true;
            }
        }
        if changed {
            continue;
        }
        let exact: Vec<(u64, u64)> = (0..weights.len())
            .map(|i| match fixed[i] {
                true => (1, 0),
                false => (weights[i] * free / free_sum, weights[i] * free % free_sum),
            })
            .collect();
        let mut out: Vec<u32> = exact.iter().map(|&(q, _)| q as u32).collect();
        let given: u64 = out.iter().map(|&q| u64::from(q)).sum();
        let mut left = budget.saturating_sub(given);
        let mut order: Vec<usize> = (0..exact.len()).filter(|&i| !fixed[i]).collect();
        order.sort_by(|&a, &b| exact[b].1.cmp(&exact[a].1));
        for i in order {
            if left == 0 {
                break;
            }
            out[i] += 1;
            left -= 1;
        }
        return out;
    }
}

#[cfg(test)]
mod tests {
    use super::{eds_part, slots, stream_size, ClusterBinding, Identities};
    use crate::xds::ClusterEndpoints;
    use std::collections::BTreeMap;

    /// Before its first update a cluster takes no VIP and keeps the
    /// identifiers saved for it (a write for another reason, such as the
    /// cluster's nodes, must not renumber it); an update that says "empty"
    /// is one.
    #[test]
    fn a_cluster_without_an_update_keeps_its_identifiers_and_takes_no_vip() {
        let binding = ClusterBinding {
            name: "web".into(),
            vip: "203.0.113.20".into(),
            ..Default::default()
        };
        let bindings = BTreeMap::from([("web".to_string(), binding)]);
        let mut identities = Identities::default();
        let saved: std::net::SocketAddr = "198.18.0.7:80".parse().unwrap();
        identities.assign("web", &[(saved, 2)]);
        let held = identities.clone();
        let part = eds_part(&bindings, &BTreeMap::new(), &mut identities);
        assert!(part.vips.is_empty() && part.streams.is_empty(), "{part:?}");
        assert_eq!(identities, held);
        let empty = BTreeMap::from([(
            "web".to_string(),
            std::sync::Arc::new(ClusterEndpoints::empty("web")),
        )]);
        let part = eds_part(&bindings, &empty, &mut identities);
        assert_eq!(part.vips.len(), 1);
        assert!(part.targets.is_empty());
    }

    #[test]
    fn xds_clusters_are_checked_as_the_catalog_uses_them() {
        let check = |clusters: &str| {
            let text = format!("[xds]\nserver = \"http://192.0.2.1:18000\"\n{clusters}");
            let c = crate::config::Config::from_toml(&text).unwrap();
            super::check_bindings(&c.xds.clusters)
        };
        let one = "[[xds.clusters]]\nname = \"a\"\nvip = \"203.0.113.1\"\nports = [\"80\"]\n";
        assert_eq!(check(one), Ok(()));
        let service = "[[xds.clusters]]\nname = \"b\"\nservice_ip = \"10.30.0.1\"\n";
        assert_eq!(check(&format!("{one}{service}")), Ok(()));
        for (clusters, wanted) in [
            (format!("{one}{one}"), "\"a\": is named twice"),
            (
                one.replace("ports", "service_ip = \"10.30.0.1\"\nports"),
                "set exactly one of vip and service_ip",
            ),
            (one.replace("\"80\"", "\"70000\""), "70000"),
            (format!("{one}protocols = [\"tcpp\"]\n"), "tcpp"),
            (one.replace("203.0.113.1", "203.0.113.300"), "203.0.113.300"),
            (
                service.replace("10.30.0.1", "2001:db8::1"),
                "not an IPv4 address",
            ),
            (
                format!("{one}{}", one.replace("\"a\"", "\"c\"")),
                "VIPs \"eds.a\" and \"eds.c\" both have the address 203.0.113.1",
            ),
            (
                format!(
                    "{}{}",
                    one.replace("203.0.113.1", "203.0.113.0/24"),
                    service.replace("10.30.0.1", "203.0.113.9")
                ),
                "cluster \"b\": service_ip 203.0.113.9 lies inside vip 203.0.113.0/24 of cluster \"a\"",
            ),
        ] {
            let e = check(&clusters).unwrap_err();
            assert!(
                e.contains("xds.clusters") && e.contains(wanted),
                "{clusters}: {e}"
            );
        }
    }

    #[test]
    fn stream_sizes_are_powers_of_two_within_the_maglev_limit() {
        assert_eq!(stream_size(0), 1);
        assert_eq!(stream_size(1), 1);
        assert_eq!(stream_size(3), 4);
        assert_eq!((stream_size(999), stream_size(1000)), (1024, 1024));
        assert_eq!(stream_size(1025), 2048);
        assert_eq!(stream_size(9000), 10_000, "the Maglev limit");
        assert_eq!(stream_size(20_000), 20_000, "left for validation to refuse");
        assert_eq!(stream_size(u32::MAX), u32::MAX);
    }

    #[test]
    fn weights_become_proportional_slots() {
        assert_eq!(slots(&[3, 1]), vec![3, 1]);
        assert_eq!(slots(&[1, 1, 1]), vec![1, 1, 1]);
        assert_eq!(slots(&[300, 100]), vec![3, 1]);
        assert_eq!(slots(&[7, 7, 7]), vec![1, 1, 1]);
        let s = slots(&[301, 100]);
        assert_eq!(s, vec![75, 25]);
        let s = slots(&[1_000_000, 1]);
        assert_eq!(s, vec![99, 1], "every backend keeps a slot");
        assert!(slots(&[]).is_empty());
        // One heavy backend among many light ones keeps its share: exact
        // while the sum is within 4 slots per backend.
        let mut w = vec![100];
        w.extend([1; 100]);
        let s = slots(&w);
        assert_eq!((s[0], s[1..].iter().all(|&n| n == 1)), (100, true));
        // Beyond that: the light ones one each, the heavy ones the rest by weight.
        let mut w = vec![1000, 500];
        w.extend([1; 98]);
        let s = slots(&w);
        assert_eq!(s.iter().sum::<u32>(), 400);
        assert_eq!(&s[..2], &[201, 101]);
        assert!(s[2..].iter().all(|&n| n == 1));
        // Within the Maglev limit, at least one each.
        let s = slots(&[u32::MAX; 3000]);
        assert!(s.iter().all(|&n| n == 1));
        let mut w = vec![u32::MAX];
        w.extend([1; 9999]);
        let s = slots(&w);
        assert_eq!((s.len(), s.iter().sum::<u32>(), s[0]), (10_000, 10_000, 1));
    }
}
