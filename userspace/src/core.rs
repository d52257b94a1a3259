//! The daemon core: configures plugins, starts them in the declared order,
//! stops them in reverse, and reports each one's state.
//!
//! One global cancellation token comes from `main`; each call gets a child of
//! it, so cancelling the global scope cancels whatever a plugin is doing.

use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use thiserror::Error;
use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// What a plugin reports when one of its calls fails.
#[derive(Debug, Error)]
#[error("{0}")]
pub struct PluginError(pub String);

impl PluginError {
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

/// A plugin failed; names it and the step.
#[derive(Debug, Error)]
#[error("plugin {plugin}: {step} failed: {source}")]
pub struct CoreError {
    pub plugin: &'static str,
    pub step: &'static str,
    #[source]
    pub source: PluginError,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PluginState {
    Registered,
    Configured,
    Starting,
    Running,
    Stopping,
    Stopped,
    Failed,
}

impl PluginState {
    pub fn name(self) -> &'static str {
        match self {
            PluginState::Registered => "registered",
            PluginState::Configured => "configured",
            PluginState::Starting => "starting",
            PluginState::Running => "running",
            PluginState::Stopping => "stopping",
            PluginState::Stopped => "stopped",
            PluginState::Failed => "failed",
        }
    }
}

/// A part of the daemon with a life cycle. Calls take `&self`: a plugin keeps
/// its mutable state behind its own locks, so `status` can be read any time.
#[async_trait]
pub trait Plugin: Send + Sync {
    fn name(&self) -> &'static str;
    async fn configure(&self, scope: CancellationToken, config: &Config)
        -> Result<(), PluginError>;
    async fn start(&self, scope: CancellationToken) -> Result<(), PluginError>;
    async fn stop(&self, scope: CancellationToken) -> Result<(), PluginError>;
    /// One line on what the plugin is doing.
    fn status(&self) -> String;
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginStatus {
    pub name: &'static str,
    pub state: PluginState,
    pub detail: String,
}

struct Entry {
    plugin: Arc<dyn Plugin>,
    state: RwLock<(PluginState, Option<String>)>,
}

/// A read-only view of the plugins, for the admin API.
#[derive(Clone)]
pub struct CoreView(Arc<RwLock<Vec<Arc<Entry>>>>);

impl CoreView {
    pub fn statuses(&self) -> Vec<PluginStatus> {
        self.0
            .read()
            .expect("plugin list lock")
            .iter()
            .map(|e| {
                let (state, failure) = e.state.read().expect("state lock").clone();
                PluginStatus {
                    name: e.plugin.name(),
                    state,
                    detail: failure.unwrap_or_else(|| e.plugin.status()),
                }
            })
            .collect()
    }
}

pub struct Core {
    global: CancellationToken,
    entries: Arc<RwLock<Vec<Arc<Entry>>>>,
    /// How many plugins (from the front) have started.
    started: usize,
}

impl Core {
    pub fn new(global: CancellationToken) -> Self {
        Self {
            global,
            entries: Arc::default(),
            started: 0,
        }
    }

    /// Adds a plugin; plugins start in the order they are registered.
    pub fn register(&mut self, plugin: Arc<dyn Plugin>) {
        self.entries
            .write()
            .expect("plugin list lock")
            .push(Arc::new(Entry {
                plugin,
                state: RwLock::new((PluginState::Registered, None)),
            }));
    }

    pub fn view(&self) -> CoreView {
        CoreView(self.entries.clone())
    }

    pub fn global(&self) -> &CancellationToken {
        &self.global
    }

    fn entries(&self) -> Vec<Arc<Entry>> {
        self.entries.read().expect("plugin list lock").clone()
    }

    fn set(entry: &Entry, state: PluginState, failure: Option<String>) {
        *entry.state.write().expect("state lock") = (state, failure);
    }

    /// Configures every plugin; stops at the first that refuses its configuration.
    pub async fn configure(&mut self, config: &Config) -> Result<(), CoreError> {
        for warning in config.deprecations() {
            tracing::warn!("{warning}");
        }
        for entry in self.entries() {
            let scope = self.global.child_token();
            match entry.plugin.configure(scope, config).await {
                Ok(()) => Self::set(&entry, PluginState::Configured, None),
                Err(source) => {
                    Self::set(&entry, PluginState::Failed, Some(source.to_string()));
                    return Err(CoreError {
                        plugin: entry.plugin.name(),
                        step: "configure",
                        source,
                    });
                }
            }
        }
        Ok(())
    }

    /// Starts plugins in order. If one fails, the started ones are stopped in
    /// reverse and the failure is returned.
    pub async fn start(&mut self) -> Result<(), CoreError> {
        for entry in self.entries() {
            Self::set(&entry, PluginState::Starting, None);
            let scope = self.global.child_token();
            match entry.plugin.start(scope).await {
                Ok(()) => {
                    Self::set(&entry, PluginState::Running, None);
                    self.started += 1;
                }
                Err(source) => {
                    Self::set(&entry, PluginState::Failed, Some(source.to_string()));
                    self.stop().await;
                    return Err(CoreError {
                        plugin: entry.plugin.name(),
                        step: "start",
                        source,
                    });
                }
            }
        }
        Ok(())
    }

    /// Stops the started plugins in reverse order. A failing stop is logged
    /// and the others still stop; returns false if any stop failed.
    pub async fn stop(&mut self) -> bool {
        let entries = self.entries();
        let mut all_stopped = true;
        while self.started > 0 {
            self.started -= 1;
            let entry = &entries[self.started];
            Self::set(entry, PluginState::Stopping, None);
            // Stop calls get a fresh scope: the global one is usually cancelled by now.
            match entry.plugin.stop(CancellationToken::new()).await {
                Ok(()) => Self::set(entry, PluginState::Stopped, None),
                Err(e) => {
                    tracing::error!(plugin = entry.plugin.name(), "stop failed: {e}");
                    Self::set(entry, PluginState::Failed, Some(e.to_string()));
                    all_stopped = false;
                }
            }
        }
        all_stopped
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Records calls into a shared log; can be told to fail one step.
    struct Probe {
        name: &'static str,
        log: Arc<Mutex<Vec<String>>>,
        fail_on: Option<&'static str>,
        saw_cancel: Arc<Mutex<bool>>,
    }

    impl Probe {
        fn step(&self, step: &'static str) -> Result<(), PluginError> {
            self.log
                .lock()
                .unwrap()
                .push(format!("{}:{step}", self.name));
            match self.fail_on {
                Some(s) if s == step => Err(PluginError::new(format!("{step} refused"))),
                _ => Ok(()),
            }
        }
    }

    #[async_trait]
    impl Plugin for Probe {
        fn name(&self) -> &'static str {
            self.name
        }
        async fn configure(&self, _: CancellationToken, _: &Config) -> Result<(), PluginError> {
            self.step("configure")
        }
        async fn start(&self, scope: CancellationToken) -> Result<(), PluginError> {
            let seen = self.saw_cancel.clone();
            tokio::spawn(async move {
                scope.cancelled().await;
                *seen.lock().unwrap() = true;
            });
            self.step("start")
        }
        async fn stop(&self, _: CancellationToken) -> Result<(), PluginError> {
            self.step("stop")
        }
        fn status(&self) -> String {
            format!("{} ok", self.name)
        }
    }

    fn core_with(
        fail: Option<(&'static str, &'static str)>,
    ) -> (Core, Arc<Mutex<Vec<String>>>, Arc<Mutex<bool>>) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let cancel = Arc::new(Mutex::new(false));
        let mut core = Core::new(CancellationToken::new());
        for name in ["a", "b", "c"] {
            core.register(Arc::new(Probe {
                name,
                log: log.clone(),
                fail_on: fail.and_then(|(p, s)| (p == name).then_some(s)),
                saw_cancel: cancel.clone(),
            }));
        }
        (core, log, cancel)
    }

    #[tokio::test]
    async fn starts_in_order_and_stops_in_reverse() {
        let (mut core, log, _) = core_with(None);
        core.configure(&Config::default()).await.unwrap();
        core.start().await.unwrap();
        let states: Vec<_> = core.view().statuses().iter().map(|s| s.state).collect();
        assert_eq!(states, vec![PluginState::Running; 3]);
        assert_eq!(core.view().statuses()[1].detail, "b ok");
        core.stop().await;
        assert_eq!(
            *log.lock().unwrap(),
            [
                "a:configure",
                "b:configure",
                "c:configure",
                "a:start",
                "b:start",
                "c:start",
                "c:stop",
                "b:stop",
                "a:stop"
            ]
        );
        let states: Vec<_> = core.view().statuses().iter().map(|s| s.state).collect();
        assert_eq!(states, vec![PluginState::Stopped; 3]);
    }

    #[tokio::test]
    async fn a_failed_start_stops_the_started_ones_in_reverse() {
        let (mut core, log, _) = core_with(Some(("c", "start")));
        core.configure(&Config::default()).await.unwrap();
        let e = core.start().await.unwrap_err();
        assert_eq!(e.to_string(), "plugin c: start failed: start refused");
        assert_eq!(
            log.lock().unwrap()[3..],
            ["a:start", "b:start", "c:start", "b:stop", "a:stop"]
        );
        let s = core.view().statuses();
        assert_eq!(s[2].state, PluginState::Failed);
        assert_eq!(s[2].detail, "start refused");
        assert_eq!(s[0].state, PluginState::Stopped);
    }

    #[tokio::test]
    async fn a_refused_configuration_names_the_plugin() {
        let (mut core, log, _) = core_with(Some(("b", "configure")));
        let e = core.configure(&Config::default()).await.unwrap_err();
        assert_eq!(e.plugin, "b");
        assert_eq!(*log.lock().unwrap(), ["a:configure", "b:configure"]);
    }

    #[tokio::test]
    async fn cancelling_the_global_scope_reaches_every_call_scope() {
        let (mut core, _, cancelled) = core_with(None);
        core.configure(&Config::default()).await.unwrap();
        core.start().await.unwrap();
        assert!(!*cancelled.lock().unwrap());
        core.global().cancel();
        for _ in 0..100 {
            if *cancelled.lock().unwrap() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert!(*cancelled.lock().unwrap());
        core.stop().await;
    }
}
