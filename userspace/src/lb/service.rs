//! The `lb` plugin: holds the VIP/stream/flow/target configuration, validates
//! every change as a whole and hands it to the dataplane. A rejected change
//! leaves the maps (and the held configuration) as they were.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use thiserror::Error;
use tokio::sync::{Mutex, Notify};
use tokio_util::sync::CancellationToken;

use super::flows::{FlowSpec, VipSpec};
use super::model::{validate_with, Capacity, LbError, LbSpec, StreamSpec, Tables, TargetSpec};
use super::tables::lb_tables;
use super::{checks, persist};
use crate::dataplane::lb::LbTables;
use crate::{
    config::Config,
    core::{Plugin, PluginError},
    dataplane::{lb::TunnelSettings, DataplaneError, DataplaneHandle},
    net::{
        neigh::{self, Resolver, Unresolved},
        watch::{Change, Watch},
        Hop,
    },
};

#[derive(Debug, Error)]
pub enum LbServiceError {
    #[error("{0}")]
    Invalid(#[from] LbError),
    #[error("{kind} {name:?} does not exist")]
    NotFound { kind: &'static str, name: String },
    #[error("{kind} {name:?} is in use by {user}; delete that or change it first")]
    InUse {
        kind: &'static str,
        name: String,
        user: String,
    },
    #[error("local target interface {interface:?} is a veth whose peer cannot take native XDP redirects (they would all be dropped): {reason}; turn on GRO at the peer (ethtool -K PEER gro on) or attach an XDP program there")]
    RedirectTarget { interface: String, reason: String },
    #[error("local target interface {interface:?} {reason}")]
    UnworkableInterface { interface: String, reason: String },
    #[error("{kind} {name:?} comes from {owner}; change it there")]
    OwnedElsewhere {
        kind: &'static str,
        name: String,
        owner: String,
    },
    #[error("writing the maps: {0}")]
    Dataplane(#[from] DataplaneError),
    #[error("LB config file {path}: {message}")]
    File { path: String, message: String },
}

/// Reads an LB configuration file (TOML) and validates it, with
/// the map space of `capacity`.
pub fn read_spec(path: &Path, capacity: Capacity) -> Result<LbSpec, LbServiceError> {
    let file = |message: String| LbServiceError::File {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| file(e.to_string()))?;
    let spec: LbSpec =
        toml::from_str(&text).map_err(|e| file(crate::config::toml_error(&text, &e)))?;
    let mut tables = Tables::default();
    tables.set_capacity(capacity);
    validate_with(&spec, &mut tables).map_err(|e| file(e.to_string()))?;
    checks::check_owners(&[("lb", &spec)]).map_err(|e| file(e.to_string()))?;
    checks::check_node(&spec, None, &[]).map_err(|e| file(e.to_string()))?;
    Ok(spec)
}

/// The daemon's LB file against its own `[lb]` settings (its tunnel address
/// and named peers, `checks::check_node`), refused with the other settings.
pub fn check_with_settings(
    path: &Path,
    spec: &LbSpec,
    lb: &crate::config::LbConfig,
) -> Result<(), LbServiceError> {
    checks::check_node(spec, lb.node_address, &lb.tunnel_peers).map_err(|e| LbServiceError::File {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

/// The daemon's LB file names local targets on interfaces of its namespace:
/// one missing there fails the start after the dataplane is attached, so
/// it is refused with the other settings (as a missing uplink is).
pub fn check_local_interfaces(path: &Path, spec: &LbSpec) -> Result<(), LbServiceError> {
    for t in &spec.targets {
        if let super::model::TargetVia::Local { interface, .. } = &t.via {
            let message = if crate::net::link::index(interface).is_none() {
                format!("interface {interface:?} does not exist")
            } else if let Some(reason) = unworkable_interface(interface) {
                format!("interface {interface:?} {reason}")
            } else {
                continue;
            };
            return Err(LbServiceError::File {
                path: path.display().to_string(),
                message: format!(
                    "target {} of stream {:?}: {message}",
                    t.identifier, t.stream
                ),
            });
        }
    }
    Ok(())
}

/// Why a local target cannot be on `interface` (found by a tester: both
/// were taken, and every packet was lost): a loopback or other link without
/// Ethernet takes no frame redirected from XDP; an uplink would send a
/// VIP's packets back out where they came in.
fn unworkable_interface(interface: &str) -> Option<String> {
    let link = crate::net::link::by_name(interface).ok()?;
    // The loopback is index 1 in every namespace (LOOPBACK_IFINDEX).
    if link.index == 1 || !link.ethernet {
        return Some("is the loopback or not an Ethernet link: it has no peer to deliver to; name the interface toward the target".into());
    }
    let id = link.xdp_program?;
    let program = aya::programs::loaded_programs()
        .flatten()
        .find(|p| p.id() == id)?;
    (program.name_as_str() == Some(tapmesh_common::program_names::XDP_UPLINK)).then(|| {
        "is an uplink (it runs tm_xdp_uplink): VIP packets would go back out where they came in; name the interface toward the target".into()
    })
}

/// Leaves out of a saved part its local targets on interfaces gone since it
/// was saved (a pod deleted while the daemon was down): the rest of the
/// operator's changes still apply, as they would have had the daemon seen
/// the interface go. Whether any was left out.
/// A target saved before such interfaces were refused (the loopback, an
/// uplink: [`unworkable_interface`]) is left out the same way, not the
/// whole part (found by a review).
fn leave_out_gone_interfaces(spec: &mut LbSpec) -> Vec<TargetSpec> {
    let why = |t: &TargetSpec| {
        let i = local_interface(t)?;
        if crate::net::link::index(i).is_none() {
            return Some("is gone; left out until it is back".to_string());
        }
        unworkable_interface(i).map(|reason| format!("{reason}; left out"))
    };
    let (gone, here) = std::mem::take(&mut spec.targets)
        .into_iter()
        .partition(|t| why(t).is_some());
    spec.targets = here;
    for t in &gone {
        tracing::warn!(
            "target {} of stream {:?}: interface {:?} {}",
            t.identifier,
            t.stream,
            local_interface(t).unwrap_or_default(),
            why(t).unwrap_or_default()
        );
    }
    gone
}

fn local_interface(target: &TargetSpec) -> Option<&str> {
    match &target.via {
        super::model::TargetVia::Local { interface, .. } => Some(interface),
        super::model::TargetVia::Remote { .. } => None,
    }
}

/// The configuration set through the admin API or file (`own`) and the parts
/// other plugins own (`others`, by plugin name); the maps get their union.
#[derive(Default)]
struct Sources {
    own: LbSpec,
    others: std::collections::BTreeMap<&'static str, LbSpec>,
    /// Maglev tables of the last validation, for streams that did not change.
    tables: Tables,
    /// Changes are validated and kept but not written (see
    /// [`LbService::hold_writes`]).
    held: bool,
}

impl Sources {
    /// Refuses an address two sources give a VIP. `changed` is the source
    /// being changed (named as the one refused), `new` its part.
    fn check(&self, changed: &str, new: &LbSpec) -> Result<(), LbError> {
        let mut parts: Vec<(&str, &LbSpec)> = Vec::new();
        if changed != "lb" {
            parts.push(("lb", &self.own));
        }
        parts.extend(
            self.others
                .iter()
                .filter(|(k, _)| **k != changed)
                .map(|(k, v)| (*k, v)),
        );
        parts.push((changed, new));
        checks::check_owners(&parts)
    }

    /// The source other than the admin/file one holding `kind` `name`.
    fn owner_of(&self, kind: &str, name: &str) -> Option<&'static str> {
        self.others.iter().find_map(|(source, part)| {
            let found = match kind {
                "VIP" => part.vips.iter().any(|v| v.name == name),
                "stream" => part.streams.iter().any(|v| v.name == name),
                "flow" => part.flows.iter().any(|v| v.name == name),
                _ => part
                    .targets
                    .iter()
                    .any(|t| format!("{}/{}", t.stream, t.identifier) == name),
            };
            found.then_some(*source)
        })
    }

    fn merged(&self, own: &LbSpec) -> LbSpec {
        let mut all = own.clone();
        for other in self.others.values() {
            all.vips.extend(other.vips.iter().cloned());
            all.streams.extend(other.streams.iter().cloned());
            all.flows.extend(other.flows.iter().cloned());
            all.targets.extend(other.targets.iter().cloned());
        }
        all
    }
}

pub struct LbService {
    dataplane: DataplaneHandle,
    spec: Mutex<Sources>,
    hops: std::sync::Mutex<Hops>,
    /// Raised when a change was applied (its remote nodes may differ).
    nodes_changed: Notify,
    /// Where the admin/file part is kept across restarts.
    store: std::sync::Mutex<persist::Store>,
    /// Local targets' interfaces (name, index) made redirect targets.
    prepared: std::sync::Mutex<BTreeSet<(String, u32)>>,
    /// `lb.tunnel_peers`: nodes no VIP may hold.
    static_peers: std::sync::Mutex<Vec<Ipv4Addr>>,
    /// Saved targets whose interface was gone at the start (a NetManager
    /// container's link comes back after this plugin starts): put back
    /// when their interface appears.
    left_out: std::sync::Mutex<Vec<TargetSpec>>,
    /// The admin/file part in force came from the saved state (a held first
    /// write that fails sets it aside, as the start does).
    own_saved: std::sync::atomic::AtomicBool,
}

impl LbService {
    pub fn new(dataplane: DataplaneHandle) -> Self {
        Self {
            dataplane,
            spec: Mutex::new(Sources::default()),
            hops: std::sync::Mutex::new(Hops::default()),
            nodes_changed: Notify::new(),
            store: std::sync::Mutex::default(),
            prepared: std::sync::Mutex::default(),
            static_peers: std::sync::Mutex::default(),
            left_out: std::sync::Mutex::default(),
            own_saved: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Puts back the left-out targets whose interface is here again, unless
    /// their stream is gone or their identifier was taken since; a target
    /// the configuration refuses stays out, with a warning.
    async fn bring_back_left_out(&self) {
        let back: Vec<TargetSpec> = {
            let mut left = self.left_out.lock().expect("left-out lock");
            if left.is_empty() {
                return;
            }
            let (back, still) = std::mem::take(&mut *left).into_iter().partition(|t| {
                local_interface(t).is_some_and(|i| crate::net::link::index(i).is_some())
            });
            *left = still;
            back
        };
        for target in back {
            let (id, stream) = (target.identifier, target.stream.clone());
            // A link of that name with another peer is another pod's.
            if let super::model::TargetVia::Local { interface, mac } = &target.via {
                let saved = super::model::parse_mac(mac).ok();
                let now = crate::net::peer::peer_mac(interface);
                if now.is_some() && now != saved {
                    tracing::warn!(
                        "target {id} of stream {stream:?}: {interface:?} is back with another peer MAC ({}); not put back, set the target again",
                        now.map(crate::net::mac_text).unwrap_or_default()
                    );
                    continue;
                }
            }
            let mut pushed = false;
            let put = self
                .update(|s| {
                    let stream_here = s.streams.iter().any(|x| x.name == target.stream);
                    let taken = s
                        .targets
                        .iter()
                        .any(|x| x.stream == target.stream && x.identifier == target.identifier);
                    if stream_here && !taken {
                        s.targets.push(target.clone());
                        pushed = true;
                    }
                    Ok(())
                })
                .await;
            match put {
                Ok(()) if pushed => tracing::info!(
                    "target {id} of stream {stream:?}: its interface is back; put back"
                ),
                Ok(()) => tracing::info!(
                    "target {id} of stream {stream:?}: its interface is back, but its stream is gone or its identifier taken; left out"
                ),
                // The link may still be being set up: tried again at its next change.
                Err(
                    e @ (LbServiceError::RedirectTarget { .. }
                    | LbServiceError::Dataplane(DataplaneError::Interface { .. })),
                ) => {
                    tracing::warn!(
                        "target {id} of stream {stream:?}: its interface is back but not usable yet: {e}"
                    );
                    self.left_out.lock().expect("left-out lock").push(target);
                }
                Err(e) => tracing::warn!(
                    "target {id} of stream {stream:?}: its interface is back but the target is refused: {e}; set it again"
                ),
            }
        }
    }

    fn static_peers(&self) -> Vec<Ipv4Addr> {
        self.static_peers.lock().expect("peers lock").clone()
    }

    fn tunnel(&self) -> TunnelSettings {
        self.dataplane.tunnel()
    }

    /// The dataplane the maps are written through (conduits attach to it too).
    pub fn dataplane(&self) -> &DataplaneHandle {
        &self.dataplane
    }

    /// The configuration in force, every source's part included.
    pub async fn spec(&self) -> LbSpec {
        let sources = self.spec.lock().await;
        sources.merged(&sources.own)
    }

    /// Replaces the whole admin/file configuration.
    pub async fn apply(&self, new: LbSpec) -> Result<(), LbServiceError> {
        self.update(|s| {
            *s = new;
            Ok(())
        })
        .await
    }

    /// Every source's part (`lb` is the admin/file one).
    pub async fn sources(&self) -> Vec<(&'static str, LbSpec)> {
        let sources = self.spec.lock().await;
        let mut all = vec![("lb", sources.own.clone())];
        all.extend(sources.others.iter().map(|(k, v)| (*k, v.clone())));
        all
    }

    /// Replaces the part plugin `source` owns; the union is validated and applied.
    pub async fn set_source(
        &self,
        source: &'static str,
        part: LbSpec,
    ) -> Result<(), LbServiceError> {
        self.set_source_freeing_later(source, part).await.0
    }

    /// [`Self::set_source`], handing back what the change replaced and built
    /// (10 000 targets take about 2 ms to free), for the caller to drop once
    /// it has answered.
    pub async fn set_source_freeing_later(
        &self,
        source: &'static str,
        part: LbSpec,
    ) -> (Result<(), LbServiceError>, Box<dyn Send>) {
        let mut sources = self.spec.lock().await;
        let tunnel = self.tunnel();
        let previous = sources.others.insert(source, part);
        let merged = sources.merged(&sources.own);
        let checked = sources.check(source, &sources.others[source]);
        let valid = checked
            .and_then(|()| {
                let capacity = self.dataplane.lb_capacity();
                sources.tables.set_capacity(capacity);
                validate_with(&merged, &mut sources.tables)
            })
            .and_then(|valid| {
                checks::check_node(&merged, tunnel.address, &self.static_peers()).map(|()| valid)
            });
        let valid = valid
            .map_err(LbServiceError::from)
            .and_then(|v| self.prepare_local(&merged).map(|()| v));
        let (result, built) = match valid {
            Ok(valid) if sources.held => (Ok(()), Some((valid, LbTables::default()))),
            Ok(valid) => {
                let tables = lb_tables(&valid);
                let result = self
                    .dataplane
                    .apply_lb(&tables, tunnel)
                    .await
                    .map(|_| self.nodes_changed.notify_one())
                    .map_err(LbServiceError::from);
                (result, Some((valid, tables)))
            }
            Err(e) => (Err(e), None),
        };
        let replaced = if result.is_err() {
            match previous {
                Some(p) => sources.others.insert(source, p),
                None => sources.others.remove(source),
            }
        } else {
            previous
        };
        (result, Box::new((replaced, merged, built)))
    }

    /// Holds map writes: changes are validated and kept, and the maps are
    /// written once, by [`Self::release_writes`]. A kept dataplane's start
    /// holds them until every source restored its part (the registry, the
    /// catalog's EDS endpoints): a first write with only the admin/file part
    /// would sweep their kept VIPs out of the maps until they wrote again.
    pub async fn hold_writes(&self) {
        self.spec.lock().await.held = true;
    }

    /// Writes what was held, every source's part at once. If that fails,
    /// it goes as without the hold: the admin/file part first (a saved part
    /// that no longer applies is set aside for the file's), then each other
    /// source's part; one that cannot be written is left out and logged, as
    /// the sources drop what they restored when it does not apply (they
    /// write again with their next change).
    pub async fn release_writes(&self) -> Result<(), LbServiceError> {
        let mut sources = self.spec.lock().await;
        if !sources.held {
            return Ok(());
        }
        sources.held = false;
        let Err(e) = self.write_sources(&mut sources).await else {
            self.store.lock().expect("store lock").save(&sources.own);
            return Ok(());
        };
        tracing::warn!(
            "the first LB write of every source failed ({e}); the admin/file part goes first"
        );
        let others = std::mem::take(&mut sources.others);
        if let Err(e) = self.write_sources(&mut sources).await {
            let saved = self
                .own_saved
                .swap(false, std::sync::atomic::Ordering::Relaxed);
            if !saved {
                sources.others = others;
                return Err(e);
            }
            let (aside, file) = {
                let store = self.store.lock().expect("store lock");
                (store.set_aside(), store.file())
            };
            let kept = aside.map_or(String::new(), |p| format!(" (kept as {})", p.display()));
            tracing::warn!(
                "the saved LB configuration no longer applies ({e}); applying the file's{kept}"
            );
            sources.own = file;
            self.left_out.lock().expect("left-out lock").clear();
            if let Err(e) = self.write_sources(&mut sources).await {
                sources.others = others;
                return Err(e);
            }
        }
        self.store.lock().expect("store lock").save(&sources.own);
        for (source, part) in others {
            sources.others.insert(source, part);
            if let Err(e) = self.write_sources(&mut sources).await {
                tracing::error!(
                    "the {} part kept from before the restart is not written: {e}",
                    checks::source_label(source)
                );
                sources.others.remove(source);
            }
        }
        Ok(())
    }

    /// Validates every source's part as it stands and writes the maps.
    async fn write_sources(&self, sources: &mut Sources) -> Result<(), LbServiceError> {
        let merged = sources.merged(&sources.own);
        let capacity = self.dataplane.lb_capacity();
        sources.tables.set_capacity(capacity);
        let valid = validate_with(&merged, &mut sources.tables)?;
        checks::check_node(&merged, self.tunnel().address, &self.static_peers())?;
        self.prepare_local(&merged)?;
        self.dataplane
            .apply_lb(&lb_tables(&valid), self.tunnel())
            .await?;
        self.nodes_changed.notify_one();
        Ok(())
    }

    /// Changes the configuration with `edit`, then validates and applies the result.
    pub async fn update(
        &self,
        edit: impl FnOnce(&mut LbSpec) -> Result<(), LbServiceError>,
    ) -> Result<(), LbServiceError> {
        let mut sources = self.spec.lock().await;
        let mut new = sources.own.clone();
        if let Err(e) = edit(&mut new) {
            return Err(match e {
                LbServiceError::NotFound { kind, name } => match sources.owner_of(kind, &name) {
                    Some(source) => LbServiceError::OwnedElsewhere {
                        kind,
                        name,
                        owner: checks::source_label(source),
                    },
                    None => LbServiceError::NotFound { kind, name },
                },
                e => e,
            });
        }
        // The targets of a stream another source owns are that source's
        // (Meridio's registrations, EDS endpoints): one set here would take
        // an identifier they then could not have.
        if let Some((t, owner)) = new
            .targets
            .iter()
            .find_map(|t| Some((t, sources.owner_of("stream", &t.stream)?)))
        {
            return Err(LbServiceError::OwnedElsewhere {
                kind: "stream",
                name: t.stream.clone(),
                owner: checks::source_label(owner),
            });
        }
        let merged = sources.merged(&new);
        sources.check("lb", &new)?;
        let capacity = self.dataplane.lb_capacity();
        sources.tables.set_capacity(capacity);
        let valid = validate_with(&merged, &mut sources.tables)?;
        checks::check_node(&merged, self.tunnel().address, &self.static_peers())?;
        self.prepare_local(&merged)?;
        // Held: saved once written (the saved file stays whole meanwhile,
        // for a fallback to set aside).
        if !sources.held {
            self.dataplane
                .apply_lb(&lb_tables(&valid), self.tunnel())
                .await?;
            self.nodes_changed.notify_one();
            self.store.lock().expect("store lock").save(&new);
        }
        sources.own = new;
        Ok(())
    }

    /// Makes each new local target's interface able to take native XDP
    /// redirects: a veth's peer gets GRO (`net::peer`). A veth whose peer
    /// cannot be reached refuses the change: the kernel would drop every
    /// frame redirected into it, counted nowhere the daemon can read.
    fn prepare_local(&self, spec: &LbSpec) -> Result<(), LbServiceError> {
        let mut prepared = self.prepared.lock().expect("prepared lock");
        // Each interface once: thousands of targets share a few interfaces,
        // and every name lookup is a syscall.
        let interfaces: std::collections::BTreeSet<&String> = spec
            .targets
            .iter()
            .filter_map(|t| match &t.via {
                super::model::TargetVia::Local { interface, .. } => Some(interface),
                _ => None,
            })
            .collect();
        for interface in interfaces {
            let Some(index) = crate::net::link::index(interface) else {
                continue;
            };
            if prepared.contains(&(interface.clone(), index)) {
                continue;
            }
            if let Some(reason) = unworkable_interface(interface) {
                return Err(LbServiceError::UnworkableInterface {
                    interface: interface.clone(),
                    reason,
                });
            }
            match crate::net::peer::prepare_redirect_target(interface) {
                Ok(Some(peer)) => {
                    tracing::info!(%interface, %peer, "GRO on at the veth peer of a local target")
                }
                Ok(None) => {}
                Err(e) => {
                    return Err(LbServiceError::RedirectTarget {
                        interface: interface.clone(),
                        reason: e.to_string(),
                    })
                }
            }
            prepared.insert((interface.clone(), index));
        }
        Ok(())
    }

    pub async fn set_vip(&self, vip: VipSpec) -> Result<(), LbServiceError> {
        self.update(|s| {
            upsert(&mut s.vips, vip, |a, b| a.name == b.name);
            Ok(())
        })
        .await
    }

    pub async fn set_stream(&self, stream: StreamSpec) -> Result<(), LbServiceError> {
        self.update(|s| {
            upsert(&mut s.streams, stream, |a, b| a.name == b.name);
            Ok(())
        })
        .await
    }

    pub async fn set_flow(&self, flow: FlowSpec) -> Result<(), LbServiceError> {
        self.update(|s| {
            upsert(&mut s.flows, flow, |a, b| a.name == b.name);
            Ok(())
        })
        .await
    }

    pub async fn set_target(&self, target: TargetSpec) -> Result<(), LbServiceError> {
        self.update(|s| {
            upsert(&mut s.targets, target, |a, b| {
                a.stream == b.stream && a.identifier == b.identifier
            });
            Ok(())
        })
        .await
    }

    pub async fn delete_vip(&self, name: &str) -> Result<(), LbServiceError> {
        self.update(|s| {
            remove(&mut s.vips, |v| v.name == name, "VIP", name)?;
            let flows = s.flows.iter().filter(|f| f.vips.iter().any(|v| v == name));
            in_use("VIP", name, listed("flow", flows.map(|f| f.name.clone())))
        })
        .await
    }

    pub async fn delete_stream(&self, name: &str) -> Result<(), LbServiceError> {
        self.update(|s| {
            remove(&mut s.streams, |v| v.name == name, "stream", name)?;
            let flows = s.flows.iter().filter(|f| f.stream == name);
            let targets = s.targets.iter().filter(|t| t.stream == name);
            let users = [
                listed("flow", flows.map(|f| f.name.clone())),
                listed(
                    "target",
                    targets.map(|t| format!("{}/{}", t.stream, t.identifier)),
                ),
            ];
            let users: Vec<String> = users.into_iter().flatten().collect();
            in_use(
                "stream",
                name,
                (!users.is_empty()).then(|| users.join(" and ")),
            )
        })
        .await
    }

    pub async fn delete_flow(&self, name: &str) -> Result<(), LbServiceError> {
        self.update(|s| remove(&mut s.flows, |v| v.name == name, "flow", name))
            .await
    }

    pub async fn delete_target(&self, stream: &str, identifier: u32) -> Result<(), LbServiceError> {
        let name = format!("{stream}/{identifier}");
        self.update(|s| {
            remove(
                &mut s.targets,
                |t| t.stream == stream && t.identifier == identifier,
                "target",
                &name,
            )
        })
        .await
    }
}

/// What the next-hop follower knows: the hops written, the neighbours they
/// depend on (resolved or not), and how often it resolved.
#[derive(Default)]
struct Hops {
    written: Option<BTreeMap<Ipv4Addr, Hop>>,
    /// This node's addresses as handed to the dataplane.
    own_written: Option<BTreeSet<IpAddr>>,
    neighbours: BTreeSet<(u32, IpAddr)>,
    nodes: usize,
    resolutions: u64,
}

/// At most this many of this node's addresses are written (a node with
/// thousands, such as kube-proxy's IPVS interface, keeps the owner maps
/// for the overlay's instances).
const MAX_OWN_ADDRS: usize = 1024;

/// The addresses of this node's interfaces that are not martians anyway
/// (the uplink refuses a tunnelled loopback, IPv6 link-local or multicast
/// source itself); None, logged, if the kernel did not answer. Beyond
/// [`MAX_OWN_ADDRS`], addresses with a subnet (a NIC's) come before host
/// addresses (/32, /128: IPVS service addresses, VIPs on `lo`), each kind
/// in address order, with a warning when the count changes.
fn own_addrs() -> Option<BTreeSet<IpAddr>> {
    static WARNED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let all = match crate::net::addr::all() {
        Ok(all) => all,
        Err(e) => {
            tracing::warn!("this node's addresses not read: {e}");
            return None;
        }
    };
    let kept = |a: &IpAddr| match a {
        IpAddr::V4(v4) => !(v4.is_loopback() || v4.is_multicast()),
        IpAddr::V6(v6) => !(v6.is_loopback() || v6.is_unicast_link_local() || v6.is_multicast()),
    };
    let mut found: Vec<(bool, IpAddr)> = Vec::new();
    for (_, p) in all.into_iter().filter(|(_, p)| kept(&p.addr)) {
        let host = p.len == if p.addr.is_ipv4() { 32 } else { 128 };
        found.push((host, p.addr));
        // An IPv4 subnet's broadcast address is a martian source to the
        // kernel too (a /31 and a /32 have none).
        if let (IpAddr::V4(v4), 0..=30) = (p.addr, p.len) {
            let broadcast = u32::from(v4) | (u32::MAX >> p.len);
            found.push((false, IpAddr::V4(broadcast.into())));
        }
    }
    found.sort();
    found.dedup_by_key(|(_, a)| *a);
    if found.len() > MAX_OWN_ADDRS
        && WARNED.swap(found.len(), std::sync::atomic::Ordering::Relaxed) != found.len()
    {
        tracing::warn!(
            "this node has {} addresses; the overlay refuses {MAX_OWN_ADDRS} of them as \
             tunnelled sources (those with a subnet first), not the others",
            found.len()
        );
    }
    Some(
        found
            .into_iter()
            .take(MAX_OWN_ADDRS)
            .map(|(_, a)| a)
            .collect(),
    )
}

/// Resolves the next hop of each node. XDP can only send to a node whose
/// neighbour is resolved (it drops with `no_neighbour` otherwise), so a node
/// whose next hop has no neighbour entry gets a *managed* one, which the
/// kernel keeps resolved; existing entries stay as they are.
fn resolve_hops(nodes: &[Ipv4Addr]) -> (BTreeMap<Ipv4Addr, Hop>, BTreeSet<(u32, IpAddr)>) {
    let (mut hops, mut neighbours) = (BTreeMap::new(), BTreeSet::new());
    let addresses: Vec<IpAddr> = nodes.iter().map(|&n| n.into()).collect();
    let resolved = match Resolver::new().and_then(|mut r| r.next_hops(&addresses)) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("remote nodes' next hops: {e}");
            return (hops, neighbours);
        }
    };
    for (&node, result) in nodes.iter().zip(resolved) {
        match result {
            Ok((hop, neighbour)) => {
                neighbours.insert((hop.ifindex, neighbour));
                hops.insert(node, hop);
            }
            Err(Unresolved::NoEntry { ifindex, address }) => {
                neighbours.insert((ifindex, address));
                match neigh::add_managed(ifindex, address) {
                    Ok(true) => {
                        tracing::info!(%node, hop = %address, ifindex, "managed neighbour entry added")
                    }
                    Ok(false) => {}
                    Err(e) => tracing::warn!(%node, "{e}"),
                }
            }
            Err(Unresolved::Waiting {
                ifindex, address, ..
            }) => {
                neighbours.insert((ifindex, address));
            }
            Err(why @ Unresolved::Route(_)) => {
                tracing::debug!(%node, "no next hop: {why}; the kernel's lookup is asked per packet")
            }
        }
    }
    (hops, neighbours)
}

impl LbService {
    /// The remote nodes of the configuration in force and of the overlay's
    /// remote instances (one resolution serves both).
    async fn remote_nodes(&self) -> Vec<Ipv4Addr> {
        let mut nodes: BTreeSet<Ipv4Addr> = self
            .spec()
            .await
            .targets
            .iter()
            .filter_map(|t| match &t.via {
                super::model::TargetVia::Remote { node } => node.parse().ok(),
                _ => None,
            })
            .collect();
        nodes.extend(self.dataplane.overlay_remote_nodes().await);
        nodes.into_iter().collect()
    }

    /// Resolves the next hop of every remote node and hands them to the
    /// dataplane (which then skips the per-packet FIB lookup for them) when
    /// they changed.
    pub async fn refresh_hops(&self) {
        let nodes = self.remote_nodes().await;
        let count = nodes.len();
        let (hops, neighbours, own) = tokio::task::spawn_blocking(move || {
            let (hops, neighbours) = resolve_hops(&nodes);
            (hops, neighbours, own_addrs())
        })
        .await
        .unwrap_or_default();
        self.refresh_own_addrs(own).await;
        let unchanged = {
            let mut state = self.hops.lock().expect("hops lock");
            state.neighbours = neighbours;
            state.nodes = count;
            state.resolutions += 1;
            state.written.as_ref() == Some(&hops)
        };
        if unchanged {
            return;
        }
        match self.dataplane.set_hops(hops.clone()).await {
            Ok(()) => self.hops.lock().expect("hops lock").written = Some(hops),
            Err(e) => tracing::debug!("next hops not written: {e}"),
        }
    }

    /// Hands this node's addresses to the dataplane when they changed
    /// (`None`: not read this time; tried again at the next change or
    /// [`OWN_ADDRS_RETRY`]).
    async fn refresh_own_addrs(&self, own: Option<BTreeSet<IpAddr>>) {
        let Some(own) = own else {
            // What was written stays; read again soon all the same.
            self.hops.lock().expect("hops lock").own_written = None;
            return;
        };
        if self.hops.lock().expect("hops lock").own_written.as_ref() == Some(&own) {
            return;
        }
        let written = self.dataplane.set_own_addrs(own.clone()).await;
        if let Err(e) = &written {
            tracing::warn!("this node's addresses not written: {e}");
        }
        // None after a failure: tried again (`follow_hops`).
        self.hops.lock().expect("hops lock").own_written = written.ok().map(|()| own);
    }

    /// Whether this node's addresses were handed to the dataplane.
    fn own_addrs_written(&self) -> bool {
        self.hops.lock().expect("hops lock").own_written.is_some()
    }

    /// Whether a change the kernel reported may move a next hop.
    fn moves_hops(&self, change: Change) -> bool {
        match change {
            Change::Neighbour { ifindex, address } => self
                .hops
                .lock()
                .expect("hops lock")
                .neighbours
                .contains(&(ifindex, address)),
            Change::Link { .. } | Change::Routing | Change::Lost => true,
        }
    }
}

/// How soon this node's addresses are read again after they could not be
/// read or written.
const OWN_ADDRS_RETRY: Duration = Duration::from_secs(5);

/// Keeps the remote nodes' next hops current: resolved again when the
/// configuration's nodes change and when the kernel reports a change of
/// routes, links or one of the hops' neighbours (a neighbour can change its
/// MAC, a route its gateway). No polling. A link's change also puts back the
/// saved targets left out at the start for want of their interface, and an
/// address change reaches the overlay's list of this node's own addresses.
async fn follow_hops(service: Arc<LbService>, stop: CancellationToken) {
    /// Changes come in bursts (a route and its neighbour, many links):
    /// they are collected this long before resolving once.
    const SETTLE: Duration = Duration::from_millis(10);
    loop {
        let mut watch = match Watch::start() {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!("{e}; trying again in 1 s");
                // Meanwhile the hops (and missing neighbour entries) are
                // kept by resolving once a second.
                service.refresh_hops().await;
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        // What changed before the watch started is seen here.
        service.bring_back_left_out().await;
        service.refresh_hops().await;
        let overlay_nodes = service.dataplane.overlay_nodes_changed();
        // A quiet node brings no change to try this node's addresses again
        // on: a deadline, which other changes do not push back.
        let mut retry_at: Option<tokio::time::Instant> = None;
        'watching: loop {
            retry_at = match (service.own_addrs_written(), retry_at) {
                (true, _) => None,
                (false, None) => Some(tokio::time::Instant::now() + OWN_ADDRS_RETRY),
                (false, at) => at,
            };
            let retry = retry_at.unwrap_or_else(tokio::time::Instant::now);
            let relevant = tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep_until(retry), if retry_at.is_some() => {
                    retry_at = None;
                    true
                }
                _ = service.nodes_changed.notified() => true,
                _ = overlay_nodes.notified() => true,
                change = watch.next() => match change {
                    Ok(c) => service.moves_hops(c),
                    Err(e) => {
                        tracing::warn!("{e}; watching again");
                        break 'watching;
                    }
                },
            };
            if !relevant {
                continue;
            }
            let settled = tokio::time::Instant::now() + SETTLE;
            while let Ok(change) = tokio::time::timeout_at(settled, watch.next()).await {
                if change.is_err() {
                    break 'watching;
                }
            }
            service.bring_back_left_out().await;
            service.refresh_hops().await;
        }
    }
}

fn upsert<T>(list: &mut Vec<T>, item: T, same: impl Fn(&T, &T) -> bool) {
    match list.iter_mut().find(|x| same(x, &item)) {
        Some(slot) => *slot = item,
        None => list.push(item),
    }
}

fn remove<T>(
    list: &mut Vec<T>,
    matches: impl Fn(&T) -> bool,
    kind: &'static str,
    name: &str,
) -> Result<(), LbServiceError> {
    let before = list.len();
    list.retain(|x| !matches(x));
    if list.len() == before {
        return Err(LbServiceError::NotFound {
            kind,
            name: name.into(),
        });
    }
    Ok(())
}

/// `kind "a"`, `kinds "a", "b", "c"` or `kinds "a", "b", "c" and N more`;
/// None for no names.
fn listed(kind: &str, names: impl Iterator<Item = String>) -> Option<String> {
    let names: Vec<String> = names.collect();
    let shown: Vec<String> = names.iter().take(3).map(|n| format!("{n:?}")).collect();
    let more = match names.len() {
        0 => return None,
        1 => return Some(format!("{kind} {}", shown[0])),
        n if n > 3 => format!(" and {} more", n - 3),
        _ => String::new(),
    };
    Some(format!("{kind}s {}{more}", shown.join(", ")))
}

/// Refuses to delete what `user` (a flow, a target) still names: said so,
/// rather than as the user's reference to something unknown.
fn in_use(kind: &'static str, name: &str, user: Option<String>) -> Result<(), LbServiceError> {
    match user {
        Some(user) => Err(LbServiceError::InUse {
            kind,
            name: name.into(),
            user,
        }),
        None => Ok(()),
    }
}

/// The plugin around [`LbService`]: applies the configured file at start.
pub struct LbPlugin {
    service: std::sync::Arc<LbService>,
    refresher: std::sync::Mutex<Option<CancellationToken>>,
}

impl LbPlugin {
    pub fn new(service: std::sync::Arc<LbService>) -> Self {
        Self {
            service,
            refresher: std::sync::Mutex::new(None),
        }
    }
}

#[async_trait]
impl Plugin for LbPlugin {
    fn name(&self) -> &'static str {
        "lb"
    }

    async fn configure(
        &self,
        _scope: CancellationToken,
        config: &Config,
    ) -> Result<(), PluginError> {
        let file = match &config.lb.config_file {
            Some(path) => {
                let spec = read_spec(path, Capacity::of(&config.dataplane))
                    .and_then(|s| check_local_interfaces(path, &s).map(|()| s))
                    .and_then(|s| check_with_settings(path, &s, &config.lb).map(|()| s))
                    .map_err(|e| PluginError::new(e.to_string()))?;
                Some(spec)
            }
            None => None,
        };
        *self.service.store.lock().expect("store lock") =
            persist::Store::new(&config.daemon.state_dir, file);
        *self.service.static_peers.lock().expect("peers lock") = config.lb.tunnel_peers.clone();
        Ok(())
    }

    async fn start(&self, scope: CancellationToken) -> Result<(), PluginError> {
        if self.service.dataplane.kept().await {
            // Released by the catalog plugin, the last source to restore its
            // part (after the registry and the cluster).
            self.service.hold_writes().await;
        }
        let (mut initial, saved) = self.service.store.lock().expect("store lock").initial();
        let left_out = if saved {
            leave_out_gone_interfaces(&mut initial)
        } else {
            Vec::new()
        };
        if !left_out.is_empty() {
            // A container's link comes back only once the NetManager
            // starts, after this: the operator gets the whole part back.
            let kept = self.service.store.lock().expect("store lock").copy_aside();
            if let Some(path) = kept {
                tracing::warn!(
                    "the saved LB configuration is kept whole as {}",
                    path.display()
                );
            }
        }
        let applied = match self.service.apply(initial).await {
            Err(e) if saved => {
                let (aside, file) = {
                    let store = self.service.store.lock().expect("store lock");
                    (store.set_aside(), store.file())
                };
                let kept = aside.map_or(String::new(), |p| format!(" (kept as {})", p.display()));
                tracing::warn!(
                    "the saved LB configuration no longer applies ({e}); applying the file's{kept}"
                );
                self.service.apply(file).await
            }
            Ok(()) => {
                *self.service.left_out.lock().expect("left-out lock") = left_out;
                self.service
                    .own_saved
                    .store(saved, std::sync::atomic::Ordering::Relaxed);
                Ok(())
            }
            other => other,
        };
        applied.map_err(|e| PluginError::new(e.to_string()))?;
        let stop = scope.child_token();
        *self.refresher.lock().expect("refresher lock") = Some(stop.clone());
        // Before the overlay's first write (its plugin starts later), so a
        // kept dataplane's entries for them are never dropped meanwhile.
        let own = tokio::task::spawn_blocking(own_addrs).await.ok().flatten();
        self.service.refresh_own_addrs(own).await;
        tokio::spawn(follow_hops(self.service.clone(), stop));
        Ok(())
    }

    async fn stop(&self, _scope: CancellationToken) -> Result<(), PluginError> {
        if let Some(stop) = self.refresher.lock().expect("refresher lock").take() {
            stop.cancel();
        }
        Ok(())
    }

    fn status(&self) -> String {
        let mut line = match self.service.spec.try_lock().map(|s| s.merged(&s.own)) {
            Ok(s) => format!(
                "{} VIPs, {} streams, {} flows, {} targets",
                s.vips.len(),
                s.streams.len(),
                s.flows.len(),
                s.targets.len()
            ),
            Err(_) => return "busy".into(),
        };
        let hops = self.service.hops.lock().expect("hops lock");
        if hops.nodes > 0 {
            let resolved = hops.written.as_ref().map_or(0, BTreeMap::len);
            line += &format!(
                "; next hops of {resolved}/{} remote nodes ({} resolutions)",
                hops.nodes, hops.resolutions
            );
        }
        line
    }
}

#[cfg(test)]
mod in_use_tests {
    use super::listed;

    #[test]
    fn users_are_listed_up_to_three_then_counted() {
        let names = |n: usize| (0..n).map(|i| format!("f{i}"));
        assert_eq!(listed("flow", names(0)), None);
        assert_eq!(listed("flow", names(1)).unwrap(), "flow \"f0\"");
        assert_eq!(
            listed("flow", names(3)).unwrap(),
            "flows \"f0\", \"f1\", \"f2\""
        );
        assert_eq!(
            listed("flow", names(32)).unwrap(),
            "flows \"f0\", \"f1\", \"f2\" and 29 more"
        );
    }
}

#[cfg(test)]
mod file_tests {
    use super::*;

    fn read(text: &str) -> Result<LbSpec, LbServiceError> {
        let path = std::env::temp_dir().join(format!("tapmesh-lb-{}.toml", std::process::id()));
        std::fs::write(&path, text).unwrap();
        let result = read_spec(&path, Capacity::default());
        let _ = std::fs::remove_file(&path);
        result
    }

    #[test]
    fn a_misspelt_key_is_refused_with_its_line_not_dropped() {
        let good = "[[vips]]\nname = \"v\"\naddress = \"192.0.2.1\"\n\n[[streams]]\nname = \"s\"\nmax_targets = 4\n\n[[flows]]\nname = \"f\"\nvips = [\"v\"]\nstream = \"s\"\nprotocols = [\"udp\"]\ndestination_port_ranges = [\"7000\"]\n";
        let spec = read(good).unwrap();
        assert_eq!(spec.flows[0].destination_port_ranges, ["7000"]);
        // A typo would have made the flow match every port.
        let typo = good.replace("destination_port_ranges", "destination_ports");
        let e = read(&typo).unwrap_err().to_string();
        assert!(
            e.contains("line 14") && e.contains("unknown field `destination_ports`"),
            "{e}"
        );
        let e = read(&good.replace("address =", "port = 80\naddress ="))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 3") && e.contains("unknown field `port`"),
            "{e}"
        );
    }
}
