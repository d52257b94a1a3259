//! The `cluster` plugin: off without `[cluster] etcd_endpoints`; else it
//! runs the node's etcd agent beside the `nsp` plugin's registry. etcd being
//! away at start is not a failure: the node works alone and says so.

use std::sync::{Arc, LazyLock, Mutex};

use async_trait::async_trait;
use etcd_client::{Certificate, Identity, TlsOptions};
use tokio_util::sync::CancellationToken;

use super::agent::{Agent, Health, Settings};
use super::record::NodeRecord;
use crate::catalog::Catalog;
use crate::config::Config;
use crate::core::{Plugin, PluginError};
use crate::dataplane::{tunnel::TunnelSettings, DataplaneHandle};
use crate::nsp::NspPlugin;

/// The running agent, for the admin API's status (one daemon per process).
static RUNNING: LazyLock<Mutex<Option<Arc<Agent>>>> = LazyLock::new(Mutex::default);

/// One node as `status` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeState {
    pub name: String,
    /// "self", "up" or "gone".
    pub state: &'static str,
    pub targets: usize,
}

/// The cluster as `status` shows it; `None` without `[cluster]`.
pub fn status() -> Option<(String, Health, Vec<NodeState>)> {
    let agent = RUNNING.lock().expect("running lock").clone()?;
    let h = agent.health();
    let me = agent.node().to_string();
    let mut nodes: Vec<NodeState> = h
        .nodes
        .iter()
        .chain(std::iter::once(&me))
        .chain(h.gone.iter())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .map(|name| NodeState {
            name: name.clone(),
            state: if *name == me {
                "self"
            } else if h.nodes.contains(name) {
                "up"
            } else {
                "gone"
            },
            targets: h.targets.get(name).copied().unwrap_or(0),
        })
        .collect();
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    Some((me, h, nodes))
}

pub struct ClusterPlugin {
    dataplane: DataplaneHandle,
    nsp: Arc<NspPlugin>,
    catalog: Arc<Catalog>,
    settings: Mutex<Option<Settings>>,
    agent: Mutex<Option<Arc<Agent>>>,
    stop: Mutex<Option<CancellationToken>>,
}

impl ClusterPlugin {
    pub fn new(dataplane: DataplaneHandle, nsp: Arc<NspPlugin>, catalog: Arc<Catalog>) -> Self {
        Self {
            dataplane,
            nsp,
            catalog,
            settings: Mutex::default(),
            agent: Mutex::default(),
            stop: Mutex::default(),
        }
    }

    /// TLS to etcd from the configured files (read now: a file that cannot
    /// be read refuses the configuration, naming it).
    fn tls(c: &crate::config::ClusterConfig) -> Result<Option<TlsOptions>, PluginError> {
        let read = |setting: &str, path: &std::path::Path| {
            std::fs::read(path).map_err(|e| {
                PluginError::new(format!("cluster.{setting}: {}: {e}", path.display()))
            })
        };
        let Some(ca) = &c.ca_file else {
            return Ok(None);
        };
        let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(read("ca_file", ca)?));
        if let (Some(cert), Some(key)) = (&c.cert_file, &c.key_file) {
            tls = tls.identity(Identity::from_pem(
                read("cert_file", cert)?,
                read("key_file", key)?,
            ));
        }
        Ok(Some(tls))
    }

    /// The node record this configuration publishes.
    fn record(config: &Config) -> NodeRecord {
        let nonempty = |list: &[&String]| -> Vec<String> {
            list.iter()
                .filter(|s| !s.is_empty())
                .map(|s| s.to_string())
                .collect()
        };
        let nm = &config.netmanager;
        NodeRecord {
            name: config.cluster.node_name.clone(),
            tunnel_addresses: TunnelSettings::of(config).address.into_iter().collect(),
            conduit_prefixes: nonempty(&[
                &config.nsp.conduit_prefix_v4,
                &config.nsp.conduit_prefix_v6,
            ]),
            container_subnets: nm
                .subnetwork
                .iter()
                .chain(nm.subnetwork_v6.iter())
                .cloned()
                .collect(),
            pod_cidrs: config.cluster.pod_cidrs.clone(),
            version: crate::VERSION.into(),
        }
    }
}

#[async_trait]
impl Plugin for ClusterPlugin {
    fn name(&self) -> &'static str {
        "cluster"
    }

    async fn configure(
        &self,
        _scope: CancellationToken,
        config: &Config,
    ) -> Result<(), PluginError> {
        let c = &config.cluster;
        if !c.enabled() {
            *self.settings.lock().expect("settings lock") = None;
            return Ok(());
        }
        let tls = Self::tls(c)?;
        *self.settings.lock().expect("settings lock") = Some(Settings {
            tls,
            endpoints: c.etcd_endpoints.clone(),
            lease_ttl: c.lease_ttl,
            prefix: c.prefix.clone(),
            state_file: config.daemon.state_dir.join("cluster.json"),
            remote_file: config.daemon.state_dir.join(super::agent::REMOTE_FILE),
            record: Self::record(config),
        });
        // The last view's other targets go into the registry's first write.
        let kept =
            super::agent::kept_remote(&config.daemon.state_dir.join(super::agent::REMOTE_FILE));
        if !kept.is_empty() {
            tracing::info!(
                "cluster: starting from {} other nodes' targets of the last view",
                kept.len()
            );
        }
        self.nsp.stage_remote(kept);
        Ok(())
    }

    async fn start(&self, scope: CancellationToken) -> Result<(), PluginError> {
        let Some(settings) = self.settings.lock().expect("settings lock").clone() else {
            return Ok(());
        };
        let nsp = self
            .nsp
            .nsp()
            .ok_or_else(|| PluginError::new("the nsp plugin is not running"))?;
        let agent = Agent::new(
            settings,
            nsp.clone(),
            self.dataplane.clone(),
            self.catalog.clone(),
        );
        nsp.join_cluster(agent.node().to_string(), agent.clone());
        let stop = scope.child_token();
        tokio::spawn(agent.clone().run(stop.clone()));
        *RUNNING.lock().expect("running lock") = Some(agent.clone());
        *self.agent.lock().expect("agent lock") = Some(agent);
        *self.stop.lock().expect("stop lock") = Some(stop);
        Ok(())
    }

    async fn stop(&self, _scope: CancellationToken) -> Result<(), PluginError> {
        if let Some(stop) = self.stop.lock().expect("stop lock").take() {
            stop.cancel();
        }
        *RUNNING.lock().expect("running lock") = None;
        Ok(())
    }

    fn status(&self) -> String {
        let Some(agent) = self.agent.lock().expect("agent lock").clone() else {
            return "off (single node)".into();
        };
        let h = agent.health();
        let etcd = if h.connected {
            format!(
                "etcd connected, revision {}, lease {:x}",
                h.revision, h.lease
            )
        } else {
            format!(
                "etcd unreachable ({}); working on the last view (revision {})",
                h.error.as_deref().unwrap_or("connecting"),
                h.revision
            )
        };
        format!(
            "node {}; {etcd}; {} nodes [{}]; {} targets of other nodes; {} bad values skipped",
            agent.node(),
            h.nodes.len(),
            h.nodes.join(" "),
            h.remote_targets,
            h.bad_values
        )
    }
}
