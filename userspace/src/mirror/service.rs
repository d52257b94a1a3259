//! The mirror plugin's state: tap services and tap flows, their statuses, and
//! what the kernel holds for them. Every change recomputes the kernel tables
//! from the whole state and writes them through the dataplane.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tapmesh_common::mirror::{MAX_RINGS, MAX_TAP_FLOWS, RULES_PER_PORT};
use tokio::sync::Mutex;

use super::model::{
    parse_vlan_filter, Destination, MirrorError, Status, TapBackend, TapFlow, TapService,
};
use super::ring::{Consumer, CopyFeed, MirrorRing, RingSocket, RingStats};
use super::tables::{mirror_tables, FlowRule};
use crate::config::RingTransport;
use crate::dataplane::DataplaneHandle;
use crate::names::validate_name;
use crate::net::link::index as interface_index;

/// The alias of an AF_XDP ring's veth pair: a leftover pair is removed only
/// with it (an operator's interfaces of the same names are not).
pub const RING_ALIAS: &str = "tapmesh mirror ring";

/// A tap flow with what the daemon knows of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowState {
    pub spec: TapFlow,
    /// Index of its VLAN set and counters.
    pub index: u32,
    /// The source interface's index when it was created (a re-created
    /// interface is another port).
    pub source_ifindex: u32,
    /// What its source port is called now, while another name than the
    /// flow's (a rename): it waits DOWN for that port to get its name back.
    pub renamed: Option<String>,
    pub status: Status,
    pub error: String,
}

pub struct ServiceState {
    pub spec: TapService,
    pub status: Status,
    pub error: String,
    /// The destination interface's index (an AF_XDP ring's own; 0 for a
    /// ring fed from the ring buffer).
    pub ifindex: u32,
    /// As for a flow: its interface's name now, while renamed (DOWN).
    pub renamed: Option<String>,
    ring: Option<Ring>,
}

struct Ring {
    slot: u32,
    /// Tells its copies from an earlier ring's in the same slot.
    generation: u8,
    /// The veth pair of a ring fed through AF_XDP.
    veth: Option<RingVeth>,
    /// The index of the interface it forwards to, when it forwards: a gone
    /// (or re-created) one takes the service with it, as for an interface
    /// service.
    forward: Option<u32>,
    running: MirrorRing,
}

struct RingVeth {
    host: String,
    peer: String,
    peer_ifindex: u32,
}

#[derive(Default)]
struct State {
    services: BTreeMap<String, ServiceState>,
    flows: BTreeMap<String, FlowState>,
    /// Interfaces whose TC programs this plugin attached.
    tc: BTreeSet<String>,
    /// Tap flows the networking-spp agent plugged (through [`TapBackend`]):
    /// only its unplug deletes them, so etcd never says "up" for a flow
    /// that is gone. Its saved taps are named at its start, before etcd
    /// answers ([`TapBackend::claim_flows`]).
    plugged: BTreeSet<String>,
}

#[derive(serde::Serialize, serde::Deserialize, Default)]
struct Persisted {
    services: Vec<TapService>,
    flows: Vec<TapFlow>,
}

pub struct MirrorService {
    dataplane: DataplaneHandle,
    state: Mutex<State>,
    state_file: std::sync::Mutex<Option<PathBuf>>,
    transport: std::sync::Mutex<RingTransport>,
    /// The last ring generation given out.
    generation: std::sync::Mutex<u8>,
    /// The reader of the kernel's copies (started with the first ring fed that way).
    feed: Mutex<Feed>,
    /// Tap flows removed because their interface went away.
    removed: tokio::sync::broadcast::Sender<String>,
}

/// The reader of `tm_mirror_copy` once started; before, the map if a
/// reader failed to start (the dataplane gives the map out once).
#[derive(Default)]
struct Feed {
    running: Option<Arc<CopyFeed>>,
    buffer: Option<aya::maps::RingBuf<aya::maps::MapData>>,
}

/// A flow's listing with its counters.
pub struct FlowListing {
    pub state: FlowState,
    pub packets: u64,
    pub bytes: u64,
    pub failed: u64,
}

pub struct ServiceListing {
    pub spec: TapService,
    pub status: Status,
    pub error: String,
    pub ring: Option<RingStats>,
}

fn check_id(field: &'static str, value: &str) -> Result<(), MirrorError> {
    validate_name(field, value).map_err(|_| MirrorError::BadName {
        field,
        value: value.into(),
    })
}

impl MirrorService {
    pub fn new(dataplane: DataplaneHandle) -> Self {
        Self {
            dataplane,
            state: Mutex::default(),
            state_file: Default::default(),
            transport: Default::default(),
            // Not where an earlier daemon's kept rules may have started.
            generation: std::sync::Mutex::new(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.subsec_nanos() as u8),
            ),
            feed: Mutex::default(),
            removed: tokio::sync::broadcast::channel(256).0,
        }
    }

    pub fn configure(&self, state_file: PathBuf, transport: RingTransport) {
        *self.state_file.lock().expect("lock") = Some(state_file);
        *self.transport.lock().expect("lock") = transport;
    }

    /// Re-creates the persisted tap services and flows. A restart is no port
    /// delete: one whose interface does not exist (yet: a VM's port at
    /// boot) waits DOWN for it, and starts when it appears (checked every
    /// second). A ring whose consumer cannot start (its pcap directory is
    /// gone, its forward interface missing) is kept in ERROR with the
    /// reason, its flows too, and starts when it is created again.
    pub async fn restore(&self) {
        let Some(path) = self.state_file.lock().expect("lock").clone() else {
            return;
        };
        let Ok(bytes) = std::fs::read(&path) else {
            return;
        };
        let persisted: Persisted = match serde_json::from_slice(&bytes) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("tap state {}", crate::statefile::refused(&path, &e));
                return;
            }
        };
        for s in persisted.services {
            let id = s.id.clone();
            let ring = matches!(s.destination, Destination::Ring(_));
            match self.create_service(s.clone()).await {
                Ok(()) => {}
                Err(e) if ring => {
                    tracing::warn!(
                        "tap service {id} kept in ERROR: {e} (create it again once fixed)"
                    );
                    self.state.lock().await.services.insert(
                        id,
                        ServiceState {
                            spec: s,
                            status: Status::Error,
                            error: e.to_string(),
                            ifindex: 0,
                            renamed: None,
                            ring: None,
                        },
                    );
                }
                Err(MirrorError::NoInterface(name)) => {
                    tracing::info!("tap service {id} waits for its interface {name:?}");
                    self.state.lock().await.services.insert(
                        id,
                        ServiceState {
                            spec: s,
                            status: Status::Down,
                            error: waiting_for(&name),
                            ifindex: 0,
                            renamed: None,
                            ring: None,
                        },
                    );
                }
                Err(e) => tracing::warn!("tap service {id} not restored: {e}"),
            }
        }
        for f in persisted.flows {
            let id = f.id.clone();
            match self.create_flow(f.clone()).await {
                Ok(()) => {}
                Err(MirrorError::NoInterface(name)) if name == f.source => {
                    tracing::info!("tap flow {id} waits for its source interface {name:?}");
                    if let Err(e) = self.keep_waiting(f).await {
                        tracing::warn!("tap flow {id} not restored: {e}");
                    }
                }
                Err(e) => tracing::warn!("tap flow {id} not restored: {e}"),
            }
        }
    }

    /// Keeps restored flow `spec`, whose source interface does not exist,
    /// DOWN until it does.
    async fn keep_waiting(&self, spec: TapFlow) -> Result<(), MirrorError> {
        let mut state = self.state.lock().await;
        if !state.services.contains_key(&spec.tap_service) {
            return Err(MirrorError::NotFound {
                kind: "tap service",
                id: spec.tap_service.clone(),
            });
        }
        let index = free_flow_index(&state)?;
        self.dataplane
            .reset_mirror_counter(index)
            .await
            .map_err(|e| MirrorError::Dataplane(e.to_string()))?;
        let error = waiting_for(&spec.source);
        state.flows.insert(
            spec.id.clone(),
            FlowState {
                spec,
                index,
                source_ifindex: 0,
                renamed: None,
                status: Status::Down,
                error,
            },
        );
        Ok(())
    }

    fn persist(&self, state: &State) {
        let Some(path) = self.state_file.lock().expect("lock").clone() else {
            return;
        };
        let persisted = Persisted {
            services: state.services.values().map(|s| s.spec.clone()).collect(),
            flows: state.flows.values().map(|f| f.spec.clone()).collect(),
        };
        if let Err(e) = crate::statefile::save(&path, &persisted) {
            tracing::error!("persisting taps to {}: {e}", path.display());
        }
    }

    pub async fn create_service(&self, spec: TapService) -> Result<(), MirrorError> {
        check_id("tap service id", &spec.id)?;
        let mut state = self.state.lock().await;
        let receives = receiving(&spec);
        if let Some(f) = state
            .flows
            .values()
            .find(|f| receives.contains(&f.spec.source))
        {
            return Err(MirrorError::Invalid(format!(
                "tap service {:?}: {:?} is the source of tap flow {:?}; copies would circle",
                spec.id, f.spec.source, f.spec.id
            )));
        }
        // The same again is a no-op, or the retry of one in ERROR.
        let retry = match state.services.get(&spec.id) {
            Some(existing) if existing.spec != spec => {
                return Err(MirrorError::Exists {
                    kind: "tap service",
                    id: spec.id,
                })
            }
            Some(existing) if existing.status != Status::Error => return Ok(()),
            Some(_) => true,
            None => false,
        };
        // Copies sent into loopback would be received by the node's own
        // stack, as if addressed to it.
        if let Some(lo) = destinations(&spec)
            .into_iter()
            .find(|name| crate::net::link::by_name(name).is_ok_and(|l| l.loopback) || *name == "lo")
        {
            return Err(MirrorError::Invalid(format!(
                "tap service {:?}: {lo:?} is the loopback device: copies sent into it would be received by this node's own stack; choose another interface",
                spec.id
            )));
        }
        // A ring's veth belongs to its ring: other copies sent into it would
        // land in that ring's consumers (its pcap file) as if they were its own.
        for name in &receives {
            if let Some(owner) = ring_veth_owner(&state, name) {
                return Err(MirrorError::Invalid(format!(
                    "tap service {:?}: {name:?} is the ring of tap service {owner:?}; choose another interface",
                    spec.id
                )));
            }
        }
        let (ifindex, ring) = match &spec.destination {
            Destination::Interface(name) => (
                interface_index(name).ok_or_else(|| MirrorError::NoInterface(name.clone()))?,
                None,
            ),
            Destination::Ring(r) => {
                if r.pcap.is_none() && r.forward.is_none() {
                    return Err(MirrorError::Invalid(
                        "a ring needs a consumer: a pcap file, an interface to forward to, or both"
                            .into(),
                    ));
                }
                if let Some(f) = &r.forward {
                    interface_index(f).ok_or_else(|| MirrorError::NoInterface(f.clone()))?;
                }
                // The daemon's working directory is no place the caller knows.
                if let Some(p) = r.pcap.as_ref().filter(|p| !p.starts_with('/')) {
                    return Err(MirrorError::Invalid(format!(
                        "pcap file {p:?}: use an absolute path"
                    )));
                }
                if let Some(p) = &r.pcap {
                    let file = pcap_file(p);
                    let same = |q: &str| pcap_file(q) == file;
                    let writer = state.services.values().find(|s| {
                        s.spec.id != spec.id
                            && matches!(&s.spec.destination, Destination::Ring(o) if o.pcap.as_deref().is_some_and(same))
                    });
                    if let Some(w) = writer {
                        return Err(MirrorError::Invalid(format!(
                            "pcap file {p:?} is written by tap service {:?} already: two writers would corrupt it",
                            w.spec.id
                        )));
                    }
                }
                let used: BTreeSet<u32> = state
                    .services
                    .values()
                    .filter_map(|s| s.ring.as_ref().map(|r| r.slot))
                    .collect();
                let slot = (0..MAX_RINGS).find(|s| !used.contains(s)).ok_or_else(|| {
                    MirrorError::Invalid(format!("all {MAX_RINGS} mirror rings are in use"))
                })?;
                let ring = match self.start_ring(&spec.id, slot, r).await {
                    Ok(ring) => ring,
                    Err(e) => {
                        if let Some(kept) = state.services.get_mut(&spec.id) {
                            kept.error = e.to_string();
                        }
                        return Err(e);
                    }
                };
                let mut ring = ring;
                ring.forward = r.forward.as_deref().and_then(interface_index);
                (ring.host_ifindex(), Some(ring))
            }
        };
        state.services.insert(
            spec.id.clone(),
            ServiceState {
                spec,
                status: Status::Active,
                error: String::new(),
                ifindex,
                renamed: None,
                ring,
            },
        );
        // Its flows waited in ERROR: they copy from now on.
        let synced = if retry {
            self.sync(&mut state).await
        } else {
            Ok(())
        };
        self.persist(&state);
        synced
    }

    async fn start_ring(
        &self,
        id: &str,
        slot: u32,
        spec: &super::model::RingSpec,
    ) -> Result<Ring, MirrorError> {
        let mut consumers = Vec::new();
        if let Some(p) = &spec.pcap {
            consumers.push(Consumer::Pcap(p.into()));
        }
        if let Some(f) = &spec.forward {
            consumers.push(Consumer::Forward(f.clone()));
        }
        let transport = *self.transport.lock().expect("lock");
        if transport == RingTransport::AfXdp {
            return self.start_xdp_ring(id, slot, consumers).await;
        }
        let feed = self.feed().await?;
        let generation = {
            let mut g = self.generation.lock().expect("lock");
            // 0 is never used: a zeroed record cannot pass for a ring's.
            *g = g.checked_add(1).unwrap_or(1);
            *g
        };
        let started = tokio::task::spawn_blocking(move || {
            MirrorRing::start_fed(format!("ring{slot}"), feed, (slot, generation), consumers)
        })
        .await
        .map_err(|e| MirrorError::Dataplane(format!("ring task failed: {e}")))?;
        let running = started.map_err(|e| ring_error(id, e))?;
        Ok(Ring {
            slot,
            generation,
            veth: None,
            forward: None,
            running,
        })
    }

    /// The reader of `tm_mirror_copy`, started on first use.
    async fn feed(&self) -> Result<Arc<CopyFeed>, MirrorError> {
        let mut feed = self.feed.lock().await;
        if let Some(f) = &feed.running {
            return Ok(f.clone());
        }
        let buffer = match feed.buffer.take() {
            Some(b) => b,
            None => self
                .dataplane
                .take_mirror_copies()
                .await
                .map_err(|e| MirrorError::Dataplane(e.to_string()))?,
        };
        let bytes = self.dataplane.mirror_copy_bytes();
        match CopyFeed::start(buffer, bytes) {
            Ok(started) => {
                feed.running = Some(started.clone());
                Ok(started)
            }
            Err(failed) => {
                feed.buffer = failed.buffer.map(|b| *b);
                Err(MirrorError::Dataplane(format!(
                    "starting the mirror copy reader: {}",
                    failed.error
                )))
            }
        }
    }

    async fn start_xdp_ring(
        &self,
        id: &str,
        slot: u32,
        consumers: Vec<Consumer>,
    ) -> Result<Ring, MirrorError> {
        let host = format!("tmr{slot}");
        let peer = format!("tmr{slot}p");
        let net = |e: crate::net::NetError| MirrorError::Dataplane(e.to_string());
        // A pair left by a daemon that did not stop goes (each end the
        // other's peer, both with the ring's alias); anything else by these
        // names is someone else's, and is never deleted.
        let exists = |name: &str| crate::net::link::index(name).is_some();
        let ours = |name: &str| {
            crate::net::link::by_name(name).is_ok_and(|l| l.alias.as_deref() == Some(RING_ALIAS))
        };
        match (exists(&host), exists(&peer)) {
            (false, false) => {}
            (true, true)
                if crate::net::peer::local_peer(&host).as_deref() == Some(&peer)
                    && ours(&host)
                    && ours(&peer) =>
            {
                tracing::info!("removing {host}/{peer}, a mirror ring pair left from before");
                let _ = crate::net::link::delete(&host).await;
            }
            (h, _) => {
                let taken = if h { &host } else { &peer };
                return Err(MirrorError::Invalid(format!(
                    "tap service {id:?}: interface {taken:?} exists and is not a mirror ring's pair \
                     ({host}/{peer}, the names of AF_XDP ring {slot}); rename or remove it"
                )));
            }
        }
        let (_, peer_ifindex) = crate::net::veth::create_local_pair(&host, &peer, RING_ALIAS)
            .await
            .map_err(net)?;
        // Copies keep an offloaded VLAN tag only if it is written into the frame here.
        if let Err(e) = crate::net::ethtool::tx_vlan_offload_off(&host) {
            let _ = crate::net::link::delete(&host).await;
            return Err(net(e));
        }
        let undo = |e: MirrorError| async {
            let _ = crate::net::link::delete(&host).await;
            e
        };
        let opened = {
            let peer = peer.clone();
            tokio::task::spawn_blocking(move || RingSocket::open(&peer)).await
        };
        let socket = match opened {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(undo(MirrorError::Dataplane(e.to_string())).await),
            Err(e) => return Err(undo(MirrorError::Dataplane(e.to_string())).await),
        };
        if let Err(e) = self
            .dataplane
            .attach_ring(&peer, peer_ifindex, slot, socket.fd())
            .await
        {
            return Err(undo(MirrorError::Dataplane(e.to_string())).await);
        }
        let started = tokio::task::spawn_blocking(move || MirrorRing::start(socket, consumers))
            .await
            .unwrap_or_else(|e| {
                Err(super::ring::RingError::NoInterface {
                    interface: format!("(ring task failed: {e})"),
                })
            });
        match started {
            Ok(running) => Ok(Ring {
                slot,
                generation: 0,
                veth: Some(RingVeth {
                    host,
                    peer,
                    peer_ifindex,
                }),
                forward: None,
                running,
            }),
            Err(e) => {
                self.dataplane.detach_ring(&peer, peer_ifindex, slot).await;
                Err(undo(ring_error(id, e)).await)
            }
        }
    }

    async fn stop_ring(&self, ring: Ring) -> RingStats {
        if let Some(v) = &ring.veth {
            self.dataplane
                .detach_ring(&v.peer, v.peer_ifindex, ring.slot)
                .await;
        }
        let veth = ring.veth;
        let running = ring.running;
        let stats = tokio::task::spawn_blocking(move || running.stop())
            .await
            .unwrap_or_default();
        if let Some(v) = veth {
            let _ = crate::net::link::delete(&v.host).await;
        }
        stats
    }

    /// The admin API's delete of a tap flow or service: refused for what the
    /// networking-spp agent plugged (a service with such a flow included).
    fn check_unplugged<'a>(
        state: &State,
        mut flows: impl Iterator<Item = &'a str>,
    ) -> Result<(), MirrorError> {
        match flows.find(|f| state.plugged.contains(*f) && state.flows.contains_key(*f)) {
            Some(flow) => Err(MirrorError::PluggedBySpp { flow: flow.into() }),
            None => Ok(()),
        }
    }

    pub async fn delete_service(&self, id: &str) -> Result<(), MirrorError> {
        let mut state = self.state.lock().await;
        let ids: Vec<String> = state
            .flows
            .values()
            .filter(|f| f.spec.tap_service == id)
            .map(|f| f.spec.id.clone())
            .collect();
        Self::check_unplugged(&state, ids.iter().map(String::as_str))?;
        self.remove_service_in(&mut state, id).await
    }

    async fn remove_service_in(&self, state: &mut State, id: &str) -> Result<(), MirrorError> {
        let Some(mut service) = state.services.remove(id) else {
            return Err(MirrorError::NotFound {
                kind: "tap service",
                id: id.into(),
            });
        };
        // Its flows go first (TaaS cascades).
        let State { flows, plugged, .. } = &mut *state;
        flows.retain(|flow, f| {
            let keep = f.spec.tap_service != id;
            if !keep {
                plugged.remove(flow);
            }
            keep
        });
        let synced = self.sync(state).await;
        if let Some(ring) = service.ring.take() {
            if ring.veth.is_none() {
                // The copies the kernel took before its rules went are still
                // in the ring buffer: into the ring's queues first.
                self.flush_feed().await;
            }
            self.stop_ring(ring).await;
        }
        self.persist(state);
        synced
    }

    /// Waits (at most 1 s) until the reader of the ring buffer has handed on
    /// every copy in it; whether it did.
    async fn flush_feed(&self) -> bool {
        let feed = self.feed.lock().await.running.clone();
        match feed {
            Some(feed) => tokio::task::spawn_blocking(move || feed.flush(Duration::from_secs(1)))
                .await
                .unwrap_or(false),
            None => true,
        }
    }

    pub async fn create_flow(&self, spec: TapFlow) -> Result<(), MirrorError> {
        self.create_flow_as(spec, false).await
    }

    /// Creates a flow; one the networking-spp agent plugs (`by_agent`) is
    /// marked as its own under the same lock, so no admin delete comes between.
    async fn create_flow_as(&self, spec: TapFlow, by_agent: bool) -> Result<(), MirrorError> {
        check_id("tap flow id", &spec.id)?;
        if let Some(filter) = &spec.vlan_filter {
            parse_vlan_filter(filter)?;
        }
        let mut state = self.state.lock().await;
        let id = spec.id.clone();
        if by_agent {
            if let Some(existing) = state.flows.get(&id) {
                if !state.plugged.contains(&id) {
                    return Err(MirrorError::Invalid(format!(
                        "tap flow {id:?} exists and was made through the admin API, not by the \
                         networking-spp agent; delete it there, or plug under another id"
                    )));
                }
                // The agent plugs it again with other tap_info: the new one
                // replaces it (what the kernel copies then matches tap_status).
                if existing.spec != spec {
                    self.remove_flow_in(&mut state, &id).await?;
                }
            }
        }
        let created = self.create_flow_in(&mut state, spec).await;
        if created.is_ok() && by_agent {
            state.plugged.insert(id);
        }
        created
    }

    async fn create_flow_in(&self, state: &mut State, spec: TapFlow) -> Result<(), MirrorError> {
        if let Some(existing) = state.flows.get(&spec.id) {
            let same_port = interface_index(&spec.source) == Some(existing.source_ifindex);
            match (existing.spec == spec, same_port) {
                (true, true) => return Ok(()),
                // It waits for its interface (or is about to start on it).
                (true, false) if existing.source_ifindex == 0 => return Ok(()),
                // Its port was re-created: the old flow is gone with the old port.
                (true, false) => {
                    state.flows.remove(&spec.id);
                }
                (false, _) => {
                    return Err(MirrorError::Exists {
                        kind: "tap flow",
                        id: spec.id,
                    })
                }
            }
        }
        // A copy must never become a source again (copies would circle).
        if let Some(s) = state
            .services
            .values()
            .find(|s| receiving(&s.spec).contains(&spec.source))
        {
            return Err(MirrorError::Invalid(format!(
                "tap flow {:?}: {:?} receives the copies of tap service {:?}; it cannot be a source",
                spec.id, spec.source, s.spec.id
            )));
        }
        // A ring's own veth carries copies: a flow on it would copy copies, in a loop.
        if let Some(owner) = ring_veth_owner(state, &spec.source) {
            return Err(MirrorError::Invalid(format!(
                "tap flow {:?}: {:?} carries the copies of tap service {owner:?}'s ring; it cannot be a source",
                spec.id, spec.source
            )));
        }
        let service =
            state
                .services
                .get(&spec.tap_service)
                .ok_or_else(|| MirrorError::NotFound {
                    kind: "tap service",
                    id: spec.tap_service.clone(),
                })?;
        let source_ifindex = interface_index(&spec.source)
            .ok_or_else(|| MirrorError::NoInterface(spec.source.clone()))?;
        if service.ifindex == source_ifindex {
            return Err(MirrorError::Invalid(format!(
                "tap flow {:?}: the source {:?} is the tap service's own destination",
                spec.id, spec.source
            )));
        }
        let index = free_flow_index(state)?;
        let on_source = state
            .flows
            .values()
            .filter(|f| f.source_ifindex == source_ifindex)
            .count();
        if on_source >= RULES_PER_PORT {
            return Err(MirrorError::Invalid(format!(
                "interface {:?} already has {RULES_PER_PORT} tap flows, the most one source port can have",
                spec.source
            )));
        }
        self.dataplane
            .reset_mirror_counter(index)
            .await
            .map_err(|e| MirrorError::Dataplane(e.to_string()))?;
        let id = spec.id.clone();
        state.flows.insert(
            id.clone(),
            FlowState {
                spec,
                index,
                source_ifindex,
                renamed: None,
                status: Status::Down,
                error: String::new(),
            },
        );
        if let Err(e) = self.sync(state).await {
            state.flows.remove(&id);
            let _ = self.sync(state).await;
            return Err(e);
        }
        self.persist(state);
        Ok(())
    }

    pub async fn delete_flow(&self, id: &str) -> Result<(), MirrorError> {
        let mut state = self.state.lock().await;
        Self::check_unplugged(&state, std::iter::once(id))?;
        self.remove_flow_in(&mut state, id).await
    }

    async fn remove_flow_in(&self, state: &mut State, id: &str) -> Result<(), MirrorError> {
        state.plugged.remove(id);
        if state.flows.remove(id).is_none() {
            return Err(MirrorError::NotFound {
                kind: "tap flow",
                id: id.into(),
            });
        }
        let synced = self.sync(state).await;
        self.persist(state);
        synced
    }

    /// Writes the kernel tables for every flow, attaches TC where a source
    /// needs it and detaches it where none does any more. Flows become ACTIVE.
    async fn sync(&self, state: &mut State) -> Result<(), MirrorError> {
        let dp = |e: crate::dataplane::DataplaneError| MirrorError::Dataplane(e.to_string());
        let (tables, sources) = mirror_tables(state.flows.values().filter_map(|f| {
            let service = state.services.get(&f.spec.tap_service).filter(|s| {
                s.status == Status::Active && f.source_ifindex != 0 && f.renamed.is_none()
            })?;
            Some(FlowRule {
                spec: &f.spec,
                index: f.index,
                source_ifindex: f.source_ifindex,
                dest_ifindex: service.ifindex,
                ring: service
                    .ring
                    .as_ref()
                    .filter(|r| r.veth.is_none())
                    .map(|r| (r.slot, r.generation)),
            })
        }))?;
        let sources: BTreeSet<String> = sources.into_iter().map(String::from).collect();
        for source in &sources {
            // Idempotent; re-attaches to an interface that was re-created.
            self.dataplane.attach_tap(source).await.map_err(dp)?;
            state.tc.insert(source.clone());
        }
        self.dataplane.apply_mirror(&tables).await.map_err(dp)?;
        for gone in state.tc.difference(&sources).cloned().collect::<Vec<_>>() {
            // Only the copy-only programs are removed; a port's full programs stay.
            let _ = self.dataplane.detach_tap(&gone).await;
            state.tc.remove(&gone);
        }
        let services = &state.services;
        for f in state.flows.values_mut() {
            match services.get(&f.spec.tap_service) {
                Some(s) if s.status == Status::Error => {
                    f.status = Status::Error;
                    f.error = format!("its tap service {:?} is in ERROR", s.spec.id);
                }
                _ if f.source_ifindex == 0 => {
                    f.status = Status::Down;
                    f.error = waiting_for(&f.spec.source);
                }
                _ if f.renamed.is_some() => {
                    f.status = Status::Down;
                    f.error = format!(
                        "its source {:?} is now called {:?}",
                        f.spec.source,
                        f.renamed.as_deref().unwrap_or_default()
                    );
                }
                Some(s) if s.status == Status::Down => {
                    f.status = Status::Down;
                    f.error = format!("its tap service {:?} is DOWN", s.spec.id);
                }
                _ => {
                    f.status = Status::Active;
                    f.error.clear();
                }
            }
        }
        Ok(())
    }

    /// Deletes the taps of interfaces that disappeared (TaaS deletes a port's
    /// tap services and flows with the port), and starts those that waited
    /// for their interface since the restart.
    pub async fn forget_gone_interfaces(&self) {
        let mut state = self.state.lock().await;
        // A renamed interface is not a deleted port: its taps wait DOWN for
        // that port (its index) to get the name back; another interface
        // taking the name is another port. The port deleted meanwhile is a
        // port delete.
        let mut renamed = false;
        for f in state.flows.values_mut() {
            let port = f.source_ifindex;
            if port == 0 {
                continue;
            }
            let now = if interface_index(&f.spec.source) == Some(port) {
                None
            } else {
                // Gone (no name at all): the port delete below.
                let Some(now) = crate::net::link::name(port) else {
                    continue;
                };
                Some(now)
            };
            if f.renamed != now {
                match &now {
                    Some(now) => tracing::info!(
                        "tap flow {}: its source {:?} is now called {now:?}; DOWN until it is {:?} again",
                        f.spec.id,
                        f.spec.source,
                        f.spec.source
                    ),
                    None => tracing::info!("tap flow {}: its source {:?} is back", f.spec.id, f.spec.source),
                }
                f.renamed = now;
                renamed = true;
            }
        }
        for s in state.services.values_mut() {
            let Destination::Interface(name) = &s.spec.destination else {
                continue;
            };
            if s.ifindex == 0 || s.status == Status::Error {
                continue;
            }
            let now = if interface_index(name) == Some(s.ifindex) {
                None
            } else {
                let Some(now) = crate::net::link::name(s.ifindex) else {
                    continue;
                };
                Some(now)
            };
            if s.renamed != now {
                match &now {
                    Some(now) => {
                        tracing::info!(
                            "tap service {}: its interface {name:?} is now called {now:?}; DOWN until it is {name:?} again",
                            s.spec.id
                        );
                        s.status = Status::Down;
                        s.error = format!("its interface {name:?} is now called {now:?}");
                    }
                    None => {
                        tracing::info!("tap service {}: its interface {name:?} is back", s.spec.id);
                        s.status = Status::Active;
                        s.error.clear();
                    }
                }
                s.renamed = now;
                renamed = true;
            }
        }
        let port_gone = |ifindex: u32, name: &str| {
            ifindex != 0
                && interface_index(name) != Some(ifindex)
                && crate::net::link::name(ifindex).is_none()
        };
        let gone_flows: Vec<String> = state
            .flows
            .values()
            .filter(|f| port_gone(f.source_ifindex, &f.spec.source))
            .map(|f| f.spec.id.clone())
            .collect();
        let gone_services: Vec<String> = state
            .services
            .values()
            .filter(|s| match &s.spec.destination {
                Destination::Interface(name) => {
                    s.status != Status::Error && port_gone(s.ifindex, name)
                }
                // The forward socket is bound to the port's index: a rename
                // changes nothing for it, a port delete ends the service.
                Destination::Ring(r) => s
                    .ring
                    .as_ref()
                    .and_then(|ring| ring.forward)
                    .is_some_and(|ifindex| port_gone(ifindex, r.forward.as_deref().unwrap_or(""))),
            })
            .map(|s| s.spec.id.clone())
            .collect();
        // What waited since the restart starts when its interface appears,
        // unless the name is a ring's own veth now (copies would land in, or
        // come from, that ring).
        let ring_veths: BTreeMap<String, String> = state
            .services
            .values()
            .filter_map(|s| Some((s.ring.as_ref()?.veth.as_ref()?, &s.spec.id)))
            .flat_map(|(v, id)| [(v.host.clone(), id.clone()), (v.peer.clone(), id.clone())])
            .collect();
        let mut appeared = false;
        for s in state.services.values_mut() {
            if let (Status::Down, Destination::Interface(name), 0) =
                (s.status, &s.spec.destination, s.ifindex)
            {
                if let Some(owner) = ring_veths.get(name) {
                    s.error = format!("{name:?} is the ring of tap service {owner:?}");
                } else if let Some(ifindex) = interface_index(name) {
                    tracing::info!("tap service {}: its interface {name:?} is here", s.spec.id);
                    (s.ifindex, s.status) = (ifindex, Status::Active);
                    s.error.clear();
                    appeared = true;
                }
            }
        }
        for f in state.flows.values_mut() {
            if f.source_ifindex == 0 && !ring_veths.contains_key(&f.spec.source) {
                if let Some(ifindex) = interface_index(&f.spec.source) {
                    tracing::info!(
                        "tap flow {}: its source {:?} is here",
                        f.spec.id,
                        f.spec.source
                    );
                    f.source_ifindex = ifindex;
                    appeared = true;
                }
            }
        }
        if gone_flows.is_empty() && gone_services.is_empty() && !appeared && !renamed {
            return;
        }
        let mut removed = Vec::new();
        for id in &gone_flows {
            tracing::info!("tap flow {id}: its source interface is gone; deleted");
            state.flows.remove(id);
            removed.push(id.clone());
        }
        let mut rings = Vec::new();
        for id in &gone_services {
            tracing::info!(
                "tap service {id}: its destination interface is gone; deleted with its flows"
            );
            if let Some(ring) = state.services.remove(id).and_then(|mut s| s.ring.take()) {
                rings.push(ring);
            }
            let flows: Vec<String> = state
                .flows
                .values()
                .filter(|f| f.spec.tap_service == *id)
                .map(|f| f.spec.id.clone())
                .collect();
            for f in flows {
                state.flows.remove(&f);
                removed.push(f);
            }
        }
        for id in removed {
            let _ = self.removed.send(id);
        }
        if let Err(e) = self.sync(&mut state).await {
            tracing::error!("after a change of the taps' interfaces: {e}");
        }
        for ring in rings {
            self.stop_ring(ring).await;
        }
        self.persist(&state);
    }

    /// Stops every ring (the daemon is stopping), once the copies already
    /// in the ring buffer are in their rings' queues.
    pub async fn stop(&self) {
        if !self.flush_feed().await {
            tracing::warn!("mirror rings: the copies' reader did not catch up within 1 s; the last copies may be lost");
        }
        let mut state = self.state.lock().await;
        let rings: Vec<Ring> = state
            .services
            .values_mut()
            .filter_map(|s| s.ring.take())
            .collect();
        for ring in rings {
            self.stop_ring(ring).await;
        }
    }

    pub async fn list(&self) -> (Vec<ServiceListing>, Vec<FlowListing>) {
        let state = self.state.lock().await;
        let services = state
            .services
            .values()
            .map(|s| ServiceListing {
                spec: s.spec.clone(),
                status: s.status,
                error: s.error.clone(),
                ring: s.ring.as_ref().map(|r| r.running.stats()),
            })
            .collect();
        let mut flows = Vec::new();
        for f in state.flows.values() {
            let c = self
                .dataplane
                .mirror_counter(f.index)
                .await
                .unwrap_or_default();
            flows.push(FlowListing {
                state: f.clone(),
                packets: c.packets,
                bytes: c.bytes,
                failed: c.failed,
            });
        }
        (services, flows)
    }

    pub fn summary(&self) -> String {
        match self.state.try_lock() {
            Ok(s) => format!(
                "{} tap services ({} rings), {} tap flows",
                s.services.len(),
                s.services.values().filter(|s| s.ring.is_some()).count(),
                s.flows.len()
            ),
            Err(_) => "busy".into(),
        }
    }
}

impl Ring {
    /// Copies go to the host end of an AF_XDP ring's veth (the socket sits
    /// on the peer); 0 for a ring fed from the ring buffer.
    fn host_ifindex(&self) -> u32 {
        self.veth
            .as_ref()
            .and_then(|v| interface_index(&v.host))
            .unwrap_or(0)
    }
}

#[async_trait::async_trait]
impl TapBackend for MirrorService {
    async fn ensure_service(&self, service: TapService) -> Result<(), MirrorError> {
        self.create_service(service).await
    }

    async fn ensure_flow(&self, flow: TapFlow) -> Result<(), MirrorError> {
        self.create_flow_as(flow, true).await
    }

    async fn claim_flows(&self, ids: &[String]) {
        self.state.lock().await.plugged.extend(ids.iter().cloned());
    }

    async fn delete_flow(&self, id: &str) -> Result<(), MirrorError> {
        let mut state = self.state.lock().await;
        match self.remove_flow_in(&mut state, id).await {
            Err(MirrorError::NotFound { .. }) => Ok(()),
            other => other,
        }
    }

    async fn delete_service(&self, id: &str) -> Result<(), MirrorError> {
        let mut state = self.state.lock().await;
        match self.remove_service_in(&mut state, id).await {
            Err(MirrorError::NotFound { .. }) => Ok(()),
            other => other,
        }
    }

    async fn service_exists(&self, id: &str) -> bool {
        self.state.lock().await.services.contains_key(id)
    }

    async fn service_in_use(&self, id: &str) -> bool {
        let state = self.state.lock().await;
        state.flows.values().any(|f| f.spec.tap_service == id)
    }

    fn removed_flows(&self) -> Option<tokio::sync::broadcast::Receiver<String>> {
        Some(self.removed.subscribe())
    }
}

/// The interfaces a tap service sends copies out of.
/// The lowest flow index (VLAN set, counters) no flow holds.
fn free_flow_index(state: &State) -> Result<u32, MirrorError> {
    let used: BTreeSet<u32> = state.flows.values().map(|f| f.index).collect();
    (0..MAX_TAP_FLOWS)
        .find(|i| !used.contains(i))
        .ok_or_else(|| MirrorError::Invalid(format!("all {MAX_TAP_FLOWS} tap flows are in use")))
}

fn waiting_for(interface: &str) -> String {
    format!("waiting for its interface {interface:?}, missing since the restart")
}

/// A ring of tap service `id` that did not start. A consumer that cannot be
/// opened (its path or interface) is the caller's to fix, not the
/// dataplane's; neither names the ring's internal slot.
fn ring_error(id: &str, e: super::ring::RingError) -> MirrorError {
    match e {
        super::ring::RingError::Consumer {
            consumer,
            step,
            source,
            ..
        } => MirrorError::Invalid(format!(
            "tap service {id:?}: consumer {consumer}: {step}: {source}"
        )),
        e => MirrorError::Dataplane(format!("tap service {id:?}: {e}")),
    }
}

/// The file a pcap path names: symlinks and `..` resolved (in its directory
/// when the file is not there yet), so two spellings of one file are one.
fn pcap_file(path: &str) -> std::path::PathBuf {
    let path = std::path::Path::new(path);
    if let Ok(real) = std::fs::canonicalize(path) {
        return real;
    }
    match (
        path.parent().and_then(|d| std::fs::canonicalize(d).ok()),
        path.file_name(),
    ) {
        (Some(dir), Some(name)) => dir.join(name),
        _ => path.components().collect(),
    }
}

fn destinations(spec: &TapService) -> Vec<&str> {
    match &spec.destination {
        Destination::Interface(i) => vec![i.as_str()],
        Destination::Ring(r) => r.forward.iter().map(String::as_str).collect(),
    }
}

/// The tap service whose AF_XDP ring uses `name` as its veth (either end).
fn ring_veth_owner<'a>(state: &'a State, name: &str) -> Option<&'a str> {
    state
        .services
        .values()
        .find(|s| {
            s.ring
                .as_ref()
                .and_then(|r| r.veth.as_ref())
                .is_some_and(|v| v.host == name || v.peer == name)
        })
        .map(|s| s.spec.id.as_str())
}

/// Where a service's copies come in again: its interfaces, and the veth
/// peer of each that is in this namespace too.
fn receiving(spec: &TapService) -> Vec<String> {
    let mut all: Vec<String> = destinations(spec).into_iter().map(String::from).collect();
    let peers: Vec<String> = all
        .iter()
        .filter_map(|i| crate::net::peer::local_peer(i))
        .collect();
    all.extend(peers);
    all
}
