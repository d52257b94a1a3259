//! The `mirror` plugin: restores the persisted taps, removes the taps of
//! interfaces that disappear, and (when etcd endpoints are configured) runs
//! the networking-spp agent that applies tap flows from etcd.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use super::service::MirrorService;
use super::spp::{SppAgent, SppSettings};
use crate::config::Config;
use crate::core::{Plugin, PluginError};

pub struct MirrorPlugin {
    service: Arc<MirrorService>,
    spp: Mutex<Option<SppSettings>>,
    stop: Mutex<Option<CancellationToken>>,
}

impl MirrorPlugin {
    pub fn new(service: Arc<MirrorService>) -> Self {
        Self {
            service,
            spp: Mutex::new(None),
            stop: Mutex::new(None),
        }
    }
}

#[async_trait]
impl Plugin for MirrorPlugin {
    fn name(&self) -> &'static str {
        "mirror"
    }

    async fn configure(
        &self,
        _scope: CancellationToken,
        config: &Config,
    ) -> Result<(), PluginError> {
        let m = &config.mirror;
        self.service.configure(
            config.daemon.state_dir.join("mirror-state.json"),
            m.ring_transport,
        );
        *self.spp.lock().expect("lock") = (!m.etcd_endpoints.is_empty()).then(|| {
            let mut s = SppSettings::new(m.etcd_endpoints.clone(), m.host.clone());
            s.prefix = m.etcd_prefix.clone();
            s.state_file = Some(config.daemon.state_dir.join("spp-state.json"));
            s
        });
        Ok(())
    }

    async fn start(&self, scope: CancellationToken) -> Result<(), PluginError> {
        self.service.restore().await;
        let stop = scope.child_token();
        let (service, done) = (self.service.clone(), stop.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = done.cancelled() => break,
                    _ = tick.tick() => service.forget_gone_interfaces().await,
                }
            }
        });
        if let Some(settings) = self.spp.lock().expect("lock").clone() {
            tracing::info!(host = %settings.host, endpoints = ?settings.endpoints, "networking-spp agent starting");
            tokio::spawn(SppAgent::run(settings, self.service.clone(), stop.clone()));
        }
        *self.stop.lock().expect("lock") = Some(stop);
        Ok(())
    }

    async fn stop(&self, _scope: CancellationToken) -> Result<(), PluginError> {
        if let Some(stop) = self.stop.lock().expect("lock").take() {
            stop.cancel();
        }
        self.service.stop().await;
        Ok(())
    }

    fn status(&self) -> String {
        let spp = match self.spp.lock().expect("lock").as_ref() {
            Some(s) => format!("; networking-spp agent for host {}", s.host),
            None => String::new(),
        };
        format!("{}{spp}", self.service.summary())
    }
}
