//! One opened stream: registers this application as a target of the stream
//! with a free identifier (DISABLED first, then ENABLED), refreshes the
//! registration every entry timeout and re-registers after an expiry,
//! keeping its identifier when it is still free.

use std::collections::BTreeSet;
use std::time::Duration;

use rand::Rng;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::conduit::ConduitView;
use super::tap::{StreamKey, StreamState};
use crate::proto::nsp::{self as pb, target_registry_client::TargetRegistryClient};

const RETRY: Duration = Duration::from_secs(1);
const COLLISION_ATTEMPTS: usize = 10;

pub struct Registration {
    client: TargetRegistryClient<tonic::transport::Channel>,
    key: StreamKey,
    timeout: Duration,
    ips: Vec<String>,
    identifier: Option<u32>,
    enabled: bool,
}

#[derive(Debug, thiserror::Error)]
enum OpenError {
    #[error("no identifier available to register the target")]
    NoIdentifier,
    #[error("registry: {0}")]
    Registry(String),
}

fn call_error(e: impl std::fmt::Display) -> OpenError {
    OpenError::Registry(e.to_string())
}

impl Registration {
    fn target(&self, status: pb::target::Status) -> pb::Target {
        let mut context = std::collections::HashMap::new();
        if let Some(id) = self.identifier {
            context.insert("identifier".to_string(), id.to_string());
        }
        pb::Target {
            ips: self.ips.clone(),
            context,
            status: status as i32,
            r#type: pb::target::Type::Default as i32,
            stream: Some(self.key.to_nsp()),
        }
    }

    async fn register(&mut self, status: pb::target::Status) -> Result<(), OpenError> {
        let target = self.target(status);
        tokio::time::timeout(self.timeout, self.client.register(target))
            .await
            .map_err(call_error)?
            .map_err(|e| OpenError::Registry(e.message().to_string()))?;
        Ok(())
    }

    /// Unregisters; false when the registry could not be reached (no
    /// answer, or the daemon's socket gone), so the entry may still be there.
    pub async fn unregister(&mut self) -> bool {
        if self.identifier.is_none() {
            return true;
        }
        let target = self.target(pb::target::Status::Disabled);
        let answer = tokio::time::timeout(self.timeout, self.client.unregister(target)).await;
        self.enabled = false;
        // Only an answer that says the entry is gone or can never be
        // removed this way ends it; a call cut short (the daemon stopping
        // mid-call reads Unknown) or a failed commit may leave it there.
        use tonic::Code::{InvalidArgument, NotFound, PermissionDenied};
        match answer {
            Ok(Ok(_)) => true,
            Ok(Err(status)) => {
                matches!(status.code(), NotFound | InvalidArgument | PermissionDenied)
            }
            Err(_) => false,
        }
    }

    /// The stream's targets: (ips, identifier, status) from the first Watch answer.
    async fn targets(&mut self) -> Result<Vec<(Vec<String>, Option<u32>, i32)>, OpenError> {
        let filter = pb::Target {
            status: pb::target::Status::Any as i32,
            r#type: pb::target::Type::Default as i32,
            stream: Some(self.key.to_nsp()),
            ..Default::default()
        };
        let first = async {
            let mut updates = self.client.watch(filter).await?.into_inner();
            updates.message().await
        };
        let list = tokio::time::timeout(self.timeout, first)
            .await
            .map_err(call_error)?
            .map_err(|e| OpenError::Registry(e.message().to_string()))?
            .unwrap_or_default();
        Ok(list
            .targets
            .into_iter()
            .map(|mut t| {
                t.ips.sort();
                let id = t.context.get("identifier").and_then(|v| v.parse().ok());
                (t.ips, id, t.status)
            })
            .collect())
    }

    /// Identifiers other targets hold (entries with our own ips excluded).
    async fn in_use(&mut self) -> Result<BTreeSet<u32>, OpenError> {
        let mine = self.ips.clone();
        Ok(self
            .targets()
            .await?
            .into_iter()
            .filter(|(ips, _, _)| *ips != mine)
            .filter_map(|(_, id, _)| id)
            .filter(|&id| id >= 1)
            .collect())
    }

    fn pick(&mut self, in_use: &BTreeSet<u32>, max: u32) {
        let free: Vec<u32> = (1..=max).filter(|k| !in_use.contains(k)).collect();
        self.identifier = Some(free[rand::rng().random_range(0..free.len())]);
    }

    /// Meridio's open: a free identifier, registered DISABLED, checked for
    /// collisions, then ENABLED.
    async fn open(&mut self, max: u32) -> Result<u32, OpenError> {
        let mut in_use = self.in_use().await?;
        if in_use.len() >= max as usize {
            return Err(OpenError::NoIdentifier);
        }
        let keep = self
            .identifier
            .is_some_and(|k| k <= max && !in_use.contains(&k));
        if !keep {
            self.pick(&in_use, max);
        }
        self.register(pb::target::Status::Disabled).await?;
        for _ in 0..COLLISION_ATTEMPTS {
            in_use = self.in_use().await?;
            if in_use.len() >= max as usize {
                self.unregister().await;
                return Err(OpenError::NoIdentifier);
            }
            let k = self.identifier.unwrap_or(0);
            if !in_use.contains(&k) {
                self.register(pb::target::Status::Enabled).await?;
                self.enabled = true;
                return Ok(k);
            }
            self.unregister().await;
            self.pick(&in_use, max);
            self.register(pb::target::Status::Disabled).await?;
        }
        Err(OpenError::NoIdentifier)
    }

    /// Refreshes the entry; false when the registry had dropped it (expiry).
    async fn refresh(&mut self) -> Result<bool, OpenError> {
        self.register(pb::target::Status::Enabled).await?;
        let mine = self.ips.clone();
        let enabled = pb::target::Status::Enabled as i32;
        Ok(self
            .targets()
            .await?
            .iter()
            .any(|(ips, id, status)| *ips == mine && *id == self.identifier && *status == enabled))
    }
}

/// The state a newly opened stream has before its task runs: on a conduit
/// already connected it is about to register (PENDING) or is not in the
/// configuration (UNDEFINED); reporting UNAVAILABLE there would be a
/// moment's lie clients act on.
pub fn first_state(view: &ConduitView, stream: &str) -> StreamState {
    match (&view.connection, &view.streams) {
        (Some(_), Some(streams)) if streams.contains_key(stream) => StreamState::Pending,
        (Some(_), Some(_)) => StreamState::Undefined,
        _ => StreamState::Unavailable,
    }
}

/// A closed stream's registration whose unregister did not reach the
/// registry (the daemon restarting): its entry would take traffic until it
/// expired, the registry having restored it.
pub struct Leftover(Registration);

impl Leftover {
    /// Unregisters again every second until the registry answers or
    /// `cancel` (the stream opened again). No time limit: a daemon restores
    /// the entry with a fresh expiry whenever it comes back.
    pub async fn retry(mut self, cancel: CancellationToken) {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(RETRY) => {}
            }
            if self.0.unregister().await {
                tracing::info!(stream = %self.0.key, "unregistered after the close");
                return;
            }
        }
    }
}

/// Runs one stream until `cancel`; reports its state through `report`.
/// Returns the registration when its last unregister did not reach the
/// registry.
pub async fn run(
    channel: tonic::transport::Channel,
    key: StreamKey,
    timeout: Duration,
    entry_timeout: Duration,
    mut view: watch::Receiver<ConduitView>,
    report: impl Fn(StreamState),
    cancel: CancellationToken,
) -> Option<Leftover> {
    let mut reg = Registration {
        client: TargetRegistryClient::new(channel),
        key: key.clone(),
        timeout,
        ips: Vec::new(),
        identifier: None,
        enabled: false,
    };
    let mut next = Instant::now();
    // Why the last attempt failed: retries then stay UNAVAILABLE (no
    // PENDING in between for Watch) and log only a new reason.
    let mut failed: Option<String> = None;
    loop {
        let current = view.borrow_and_update().clone();
        let max = current
            .streams
            .as_ref()
            .map(|s| s.get(&key.stream).copied());
        match (&current.connection, max) {
            (None, _) => {
                reg.enabled = false;
                report(StreamState::Unavailable);
            }
            // The configuration cannot be read (daemon restarting): keep the
            // registration as it is; the next refresh tells whether it lived.
            (_, None) => report(StreamState::Unavailable),
            (Some(_), Some(None)) => {
                // Not (or no longer) in the configuration.
                reg.unregister().await;
                report(StreamState::Undefined);
            }
            (Some(c), Some(Some(max))) if Instant::now() >= next => {
                let mut ips = c.local_ips.clone();
                ips.sort();
                if ips != reg.ips {
                    reg.unregister().await;
                    reg.ips = ips;
                }
                let result = if reg.enabled {
                    match reg.refresh().await {
                        Ok(true) => Ok(()),
                        Ok(false) => {
                            tracing::info!(stream = %key, "registration expired; registering again");
                            reg.enabled = false;
                            reg.open(max).await.map(|_| ())
                        }
                        Err(e) => Err(e),
                    }
                } else {
                    if failed.is_none() {
                        report(StreamState::Pending);
                    }
                    reg.open(max).await.map(|k| {
                        tracing::info!(stream = %key, identifier = k, "stream open");
                    })
                };
                match result {
                    Ok(()) => {
                        failed = None;
                        report(StreamState::Open);
                        next = Instant::now() + entry_timeout;
                    }
                    Err(e) => {
                        let why = e.to_string();
                        if failed.as_ref() != Some(&why) {
                            tracing::warn!(stream = %key, "open: {why}; retrying every {RETRY:?}");
                        }
                        failed = Some(why);
                        reg.enabled = false;
                        report(StreamState::Unavailable);
                        next = Instant::now() + RETRY;
                    }
                }
            }
            _ => {}
        }
        tokio::select! {
            _ = cancel.cancelled() => break,
            changed = view.changed() => {
                if changed.is_err() { break }
                next = Instant::now();
            }
            _ = tokio::time::sleep_until(next.max(Instant::now() + Duration::from_millis(1))) => {}
        }
    }
    if reg.unregister().await {
        None
    } else {
        Some(Leftover(reg))
    }
}
