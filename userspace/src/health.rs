//! Control-plane health: what each control plane last reported (connected,
//! synced, last ACK and NACK, reload errors), for `/readyz`, `/metrics` and
//! `status`.
//!
//! One table per process: the reporters sit deep inside their own tasks (the
//! xDS client, the NSP file watcher), and a process runs one daemon.

use std::collections::BTreeMap;
use std::sync::{LazyLock, Mutex};

/// The health of one control plane.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PlaneHealth {
    /// Configured: readiness waits for it.
    pub expected: bool,
    pub connected: bool,
    /// Its first complete state was applied.
    pub synced: bool,
    /// Why it is not connected, or what it is doing.
    pub detail: String,
    pub last_ack: Option<String>,
    /// Version and reason of the last rejected update.
    pub last_nack: Option<(String, String)>,
    /// The last reload of its file failed with this (cleared by a good one).
    pub reload_error: Option<String>,
}

#[derive(Default)]
pub struct Planes(Mutex<BTreeMap<&'static str, PlaneHealth>>);

static PLANES: LazyLock<Planes> = LazyLock::new(Planes::default);

/// The process's control planes.
pub fn planes() -> &'static Planes {
    &PLANES
}

impl Planes {
    /// Forgets every plane and expects exactly `names` (a daemon's configure).
    pub fn expect(&self, names: &[&'static str]) {
        let mut planes = self.0.lock().expect("planes lock");
        planes.clear();
        for &name in names {
            planes.insert(
                name,
                PlaneHealth {
                    expected: true,
                    detail: "not started".into(),
                    ..Default::default()
                },
            );
        }
    }

    /// Changes one plane's record.
    pub fn update(&self, name: &'static str, change: impl FnOnce(&mut PlaneHealth)) {
        change(self.0.lock().expect("planes lock").entry(name).or_default());
    }

    pub fn snapshot(&self) -> BTreeMap<&'static str, PlaneHealth> {
        self.0.lock().expect("planes lock").clone()
    }

    /// Expected planes that have not synced yet, with why.
    pub fn unsynced(&self) -> Vec<String> {
        self.snapshot()
            .into_iter()
            .filter(|(_, h)| h.expected && !h.synced)
            .map(|(name, h)| match h.detail.as_str() {
                "" => format!("{name}: not synced yet"),
                detail => format!("{name}: {detail}"),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_waits_for_every_expected_plane() {
        let planes = Planes::default();
        planes.expect(&["xds", "nsp"]);
        assert_eq!(planes.unsynced().len(), 2);
        planes.update("nsp", |h| h.synced = true);
        planes.update("etcd", |h| h.connected = true);
        assert_eq!(planes.unsynced(), ["xds: not started"]);
        planes.update("xds", |h| h.synced = true);
        assert!(planes.unsynced().is_empty());
    }
}
