//! The `lb` plugin: holds the VIP/stream/flow/target configuration, validates
//! every change as a whole and hands it to the dataplane. A rejected change
//! leaves the maps (and the held configuration) as they were.

use std::path::Path;

use async_trait::async_trait;
use thiserror::Error;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::model::{validate, validate_with, LbError, LbSpec, StreamSpec, Tables, TargetSpec};
use crate::{
    config::Config,
    core::{Plugin, PluginError},
    dataplane::{lb::TunnelSettings, DataplaneError, DataplaneHandle},
    flows::{FlowSpec, VipSpec},
};

#[derive(Debug, Error)]
pub enum LbServiceError {
    #[error("{0}")]
    Invalid(#[from] LbError),
    #[error("{kind} {name:?} does not exist")]
    NotFound { kind: &'static str, name: String },
    #[error("writing the maps: {0}")]
    Dataplane(#[from] DataplaneError),
    #[error("LB config file {path}: {message}")]
    File { path: String, message: String },
}

/// Reads an LB configuration file (TOML) and validates it.
pub fn read_spec(path: &Path) -> Result<LbSpec, LbServiceError> {
    let file = |message: String| LbServiceError::File {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| file(e.to_string()))?;
    let spec: LbSpec = toml::from_str(&text).map_err(|e| file(e.message().replace('\n', " ")))?;
    validate(&spec).map_err(|e| file(e.to_string()))?;
    Ok(spec)
}

/// The configuration set through the admin API or file (`own`) and the parts
/// other plugins own (`others`, by plugin name); the maps get their union.
#[derive(Default)]
struct Sources {
    own: LbSpec,
    others: std::collections::BTreeMap<&'static str, LbSpec>,
    /// Maglev tables of the last validation, for streams that did not change.
    tables: Tables,
}

impl Sources {
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
    tunnel: std::sync::Mutex<TunnelSettings>,
}

impl LbService {
    pub fn new(dataplane: DataplaneHandle) -> Self {
        Self {
            dataplane,
            spec: Mutex::new(Sources::default()),
            tunnel: std::sync::Mutex::new(TunnelSettings::default()),
        }
    }

    fn tunnel(&self) -> TunnelSettings {
        *self.tunnel.lock().expect("tunnel lock")
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
        let mut sources = self.spec.lock().await;
        let previous = sources.others.insert(source, part);
        let merged = sources.merged(&sources.own);
        let valid = validate_with(&merged, &mut sources.tables);
        let result = match valid {
            Ok(valid) => self
                .dataplane
                .apply_lb(&valid, self.tunnel())
                .await
                .map(|_| keep_neighbours_resolved(&valid))
                .map_err(LbServiceError::from),
            Err(e) => Err(e.into()),
        };
        if result.is_err() {
            match previous {
                Some(p) => sources.others.insert(source, p),
                None => sources.others.remove(source),
            };
        }
        result
    }

    /// Changes the configuration with `edit`, then validates and applies the result.
    pub async fn update(
        &self,
        edit: impl FnOnce(&mut LbSpec) -> Result<(), LbServiceError>,
    ) -> Result<(), LbServiceError> {
        let mut sources = self.spec.lock().await;
        let mut new = sources.own.clone();
        edit(&mut new)?;
        let merged = sources.merged(&new);
        let valid = validate_with(&merged, &mut sources.tables)?;
        self.dataplane.apply_lb(&valid, self.tunnel()).await?;
        keep_neighbours_resolved(&valid);
        sources.own = new;
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
        self.update(|s| remove(&mut s.vips, |v| v.name == name, "VIP", name))
            .await
    }

    pub async fn delete_stream(&self, name: &str) -> Result<(), LbServiceError> {
        self.update(|s| remove(&mut s.streams, |v| v.name == name, "stream", name))
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

/// XDP can only send to a node whose neighbour entry is resolved (it drops
/// with `no_neighbour` otherwise), so every remote node gets a *managed*
/// neighbour entry, which the kernel keeps resolved. Existing entries stay.
fn keep_neighbours_resolved(valid: &super::model::ValidLb) {
    let nodes: std::collections::BTreeSet<std::net::Ipv4Addr> = valid
        .targets
        .iter()
        .filter_map(|t| match t.via {
            super::model::ValidVia::Remote { node } => Some(node),
            _ => None,
        })
        .collect();
    for node in nodes {
        tokio::spawn(async move {
            let node = node.to_string();
            let route = tokio::process::Command::new("ip")
                .args(["-o", "route", "get", &node])
                .output()
                .await;
            let text = match route {
                Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).to_string(),
                _ => {
                    tracing::warn!(%node, "no route to the remote node; its targets get no traffic");
                    return;
                }
            };
            let Some(dev) = text
                .split_whitespace()
                .skip_while(|w| *w != "dev")
                .nth(1)
                .map(str::to_string)
            else {
                return;
            };
            let gateway = text
                .split_whitespace()
                .skip_while(|w| *w != "via")
                .nth(1)
                .map(str::to_string);
            let hop = gateway.unwrap_or(node.clone());
            let added = tokio::process::Command::new("ip")
                .args(["neigh", "add", &hop, "dev", &dev, "managed"])
                .output()
                .await;
            if let Ok(out) = added {
                if out.status.success() {
                    tracing::info!(%node, %hop, %dev, "managed neighbour entry added");
                }
            }
        });
    }
}

/// Finds the egress interface and MACs towards `node` from the kernel's route
/// and neighbour tables (only a resolved neighbour counts).
async fn resolve_hop(node: std::net::Ipv4Addr) -> Option<crate::dataplane::lb::Hop> {
    let run = |args: Vec<String>| async move {
        let out = tokio::process::Command::new("ip")
            .args(&args)
            .output()
            .await
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).to_string())
    };
    let word_after = |text: &str, key: &str| {
        text.split_whitespace()
            .skip_while(|w| *w != key)
            .nth(1)
            .map(str::to_string)
    };
    let route = run(vec![
        "-o".into(),
        "route".into(),
        "get".into(),
        node.to_string(),
    ])
    .await?;
    let dev = word_after(&route, "dev")?;
    let hop = word_after(&route, "via").unwrap_or(node.to_string());
    let neigh = run(vec![
        "neigh".into(),
        "show".into(),
        hop,
        "dev".into(),
        dev.clone(),
    ])
    .await?;
    let resolved = ["REACHABLE", "STALE", "DELAY", "PROBE", "PERMANENT", "NOARP"]
        .iter()
        .any(|s| neigh.contains(s));
    let dst = word_after(&neigh, "lladdr").filter(|_| resolved)?;
    let link = run(vec![
        "-o".into(),
        "link".into(),
        "show".into(),
        "dev".into(),
        dev.clone(),
    ])
    .await?;
    let src = word_after(&link, "link/ether")?;
    let index: u32 = link.split(':').next()?.trim().parse().ok()?;
    let mac = |text: &str| {
        let mut m = [0u8; 6];
        let parts: Vec<&str> = text.split(':').collect();
        if parts.len() != 6 {
            return None;
        }
        for (b, p) in m.iter_mut().zip(parts) {
            *b = u8::from_str_radix(p, 16).ok()?;
        }
        Some(m)
    };
    Some(crate::dataplane::lb::Hop {
        ifindex: index,
        dst_mac: mac(&dst)?,
        src_mac: mac(&src)?,
    })
}

impl LbService {
    /// Resolves the next hop of every remote node and hands them to the
    /// dataplane (which then skips the per-packet FIB lookup for them).
    pub async fn refresh_hops(&self) {
        let nodes: std::collections::BTreeSet<std::net::Ipv4Addr> = self
            .spec()
            .await
            .targets
            .iter()
            .filter_map(|t| match &t.via {
                super::model::TargetVia::Remote { node } => node.parse().ok(),
                _ => None,
            })
            .collect();
        let mut hops = std::collections::BTreeMap::new();
        for node in nodes {
            if let Some(hop) = resolve_hop(node).await {
                hops.insert(node, hop);
            }
        }
        if let Err(e) = self.dataplane.set_hops(hops).await {
            tracing::debug!("next hops not written: {e}");
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

/// The plugin around [`LbService`]: applies the configured file at start.
pub struct LbPlugin {
    service: std::sync::Arc<LbService>,
    initial: std::sync::Mutex<Option<LbSpec>>,
    refresher: std::sync::Mutex<Option<CancellationToken>>,
}

impl LbPlugin {
    pub fn new(service: std::sync::Arc<LbService>) -> Self {
        Self {
            service,
            initial: std::sync::Mutex::new(None),
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
        *self.service.tunnel.lock().expect("tunnel lock") = TunnelSettings {
            port: config.lb.tunnel_port,
            address: config.lb.node_address,
        };
        let initial = match &config.lb.config_file {
            Some(path) => Some(read_spec(path).map_err(|e| PluginError::new(e.to_string()))?),
            None => None,
        };
        *self.initial.lock().expect("initial lock") = initial;
        Ok(())
    }

    async fn start(&self, scope: CancellationToken) -> Result<(), PluginError> {
        let initial = self
            .initial
            .lock()
            .expect("initial lock")
            .take()
            .unwrap_or_default();
        self.service
            .apply(initial)
            .await
            .map_err(|e| PluginError::new(e.to_string()))?;
        // Keep remote nodes' next hops current (a neighbour can change its MAC).
        let service = self.service.clone();
        let stop = scope.child_token();
        *self.refresher.lock().expect("refresher lock") = Some(stop.clone());
        tokio::spawn(async move {
            loop {
                service.refresh_hops().await;
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
                }
            }
        });
        Ok(())
    }

    async fn stop(&self, _scope: CancellationToken) -> Result<(), PluginError> {
        if let Some(stop) = self.refresher.lock().expect("refresher lock").take() {
            stop.cancel();
        }
        Ok(())
    }

    fn status(&self) -> String {
        match self.service.spec.try_lock().map(|s| s.merged(&s.own)) {
            Ok(s) => format!(
                "{} VIPs, {} streams, {} flows, {} targets",
                s.vips.len(),
                s.streams.len(),
                s.flows.len(),
                s.targets.len()
            ),
            Err(_) => "busy".into(),
        }
    }
}
