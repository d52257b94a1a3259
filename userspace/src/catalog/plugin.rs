//! The `catalog` plugin: holds the catalog and, when `[xds] server` is set,
//! runs the xDS client that feeds it; when `[xds] serve` is set, serves its
//! EDS clusters to the node's proxies ([`crate::xds::EdsServer`]).

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use super::Catalog;
use crate::config::{Config, XdsConfig};
use crate::core::{Plugin, PluginError};
use crate::xds::XdsSettings;

pub struct CatalogPlugin {
    catalog: Arc<Catalog>,
    config: Mutex<XdsConfig>,
    stop: Mutex<Option<CancellationToken>>,
}

impl CatalogPlugin {
    pub fn new(catalog: Arc<Catalog>) -> Self {
        Self {
            catalog,
            config: Mutex::new(XdsConfig::default()),
            stop: Mutex::new(None),
        }
    }
}

#[async_trait]
impl Plugin for CatalogPlugin {
    fn name(&self) -> &'static str {
        "catalog"
    }

    async fn configure(
        &self,
        _scope: CancellationToken,
        config: &Config,
    ) -> Result<(), PluginError> {
        let x = &config.xds;
        super::check_bindings(&x.clusters).map_err(PluginError::new)?;
        if !x.serve.is_empty() && x.serve.parse::<std::net::SocketAddr>().is_err() {
            return Err(PluginError::new(format!(
                "xds.serve {:?} is not an address:port",
                x.serve
            )));
        }
        *self.config.lock().expect("lock") = x.clone();
        self.catalog.set_bindings(x.clusters.clone()).await;
        self.catalog
            .set_state_dir(&config.daemon.state_dir)
            .await
            .map_err(PluginError::new)?;
        Ok(())
    }

    async fn start(&self, scope: CancellationToken) -> Result<(), PluginError> {
        let x = self.config.lock().expect("lock").clone();
        let stop = scope.child_token();
        if !x.serve.is_empty() {
            let server = crate::xds::EdsServer::bind(&x.serve, self.catalog.watch_loads())
                .await
                .map_err(|e| PluginError::new(format!("EDS server on {}: {e}", x.serve)))?;
            let cancel = stop.clone();
            tokio::spawn(async move {
                if let Err(e) = server.run(cancel).await {
                    tracing::error!("EDS server failed: {e}");
                }
            });
        }
        // Before the client: its first update comes after them.
        self.catalog.write_restored().await;
        // The LB's first write on a kept dataplane waited for every source
        // to restore its part; the catalog is the last.
        self.catalog
            .lb()
            .release_writes()
            .await
            .map_err(|e| PluginError::new(format!("the first LB write: {e}")))?;
        if !x.server.is_empty() {
            let settings = XdsSettings {
                server: x.server.clone(),
                node_id: x.node_id.clone(),
                node_cluster: x.node_cluster.clone(),
                clusters: x.clusters.iter().map(|c| c.name.clone()).collect(),
                ads: x.ads,
                protocol: x.protocol,
                missing_after: x.missing_after,
                ..XdsSettings::default()
            };
            tracing::info!(server = %x.server, clusters = ?settings.clusters, ads = x.ads, "xDS client starting");
            tokio::spawn(crate::xds::run(
                settings,
                self.catalog.clone(),
                stop.clone(),
            ));
        }
        *self.stop.lock().expect("lock") = Some(stop);
        Ok(())
    }

    async fn stop(&self, _scope: CancellationToken) -> Result<(), PluginError> {
        if let Some(stop) = self.stop.lock().expect("lock").take() {
            stop.cancel();
        }
        self.catalog.saved(std::time::Duration::from_secs(2)).await;
        Ok(())
    }

    fn status(&self) -> String {
        let x = self.config.lock().expect("lock");
        let mut status = if x.server.is_empty() {
            "no xDS server configured".to_string()
        } else {
            format!(
                "xDS client of {} for {} clusters",
                x.server,
                x.clusters.len()
            )
        };
        if !x.serve.is_empty() {
            status.push_str(&format!("; serving EDS on {}", x.serve));
        }
        status
    }
}
