//! The target registry (nsp.v1.TargetRegistry semantics): targets keyed by
//! their IPs, type and stream; a target seen for the first time is DISABLED
//! whatever it asks; an entry not refreshed within the expiry is removed.
//! Every operation reports whether anything a watcher can see changed.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::config::{NspConfig, StreamPath};
use crate::net::Prefix;

pub const IDENTIFIER: &str = "identifier";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Status {
    Enabled,
    Disabled,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Kind {
    Default,
    Frontend,
}

/// A registered target, as the registry stores and persists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// Sorted CIDRs.
    pub ips: Vec<String>,
    pub context: BTreeMap<String, String>,
    pub status: Status,
    pub kind: Kind,
    /// `None` only for FRONTEND targets.
    pub stream: Option<StreamPath>,
}

impl Target {
    /// The registry key: IPs, type and stream (not the identifier or status).
    pub fn key(&self) -> String {
        let stream = self.stream.as_ref().map(StreamPath::full_name);
        format!(
            "{}-{:?}-{}",
            self.ips.join(";"),
            self.kind,
            stream.unwrap_or_default()
        )
    }

    pub fn identifier(&self) -> Option<u32> {
        self.context.get(IDENTIFIER)?.parse().ok()
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum RegistryError {
    #[error("target has no ips; register the CIDRs of its conduit interface")]
    NoIps,
    #[error("target ip {0:?} is not a CIDR such as \"172.16.0.2/24\"")]
    BadIp(String),
    #[error("a DEFAULT target needs a stream with its conduit and trench")]
    NoStream,
    #[error("stream {0:?} is not defined in the configuration")]
    UnknownStream(String),
    #[error(
        "target identifier {value:?} is not a number in 1..={max_targets} (stream {stream:?})"
    )]
    BadIdentifier {
        stream: String,
        value: String,
        max_targets: u32,
    },
    #[error("ips {0:?} are not as a registry keeps them: sorted CIDRs, each once")]
    NotCanonical(Vec<String>),
    #[error("identifier {0:?} is not a number from 1")]
    NotAnIdentifier(String),
    #[error("stream {stream:?} already has {max_targets} targets (its maxTargets)")]
    Full { stream: String, max_targets: u32 },
    #[error("identifier {identifier} of stream {stream:?} is already enabled for another target; pick a free one")]
    Collision { stream: String, identifier: u32 },
}

#[derive(Clone)]
struct Entry {
    target: Target,
    expires: Instant,
}

/// Targets with their keep-alive deadlines.
#[derive(Clone)]
pub struct Registry {
    entries: BTreeMap<String, Entry>,
    expiry: Duration,
}

impl Registry {
    pub fn new(expiry: Duration) -> Self {
        Self {
            entries: BTreeMap::new(),
            expiry,
        }
    }

    /// Re-adds persisted targets, each with a fresh deadline.
    pub fn restore(&mut self, targets: Vec<Target>, now: Instant) {
        for target in targets {
            let expires = now + self.expiry;
            self.entries.insert(target.key(), Entry { target, expires });
        }
    }

    pub fn targets(&self) -> Vec<Target> {
        self.entries.values().map(|e| e.target.clone()).collect()
    }

    /// For a target not registered yet: how many targets with its ips are.
    /// `None` if it is registered (a refresh) or its ips are not valid.
    pub fn others_with_ips(&self, target: &Target) -> Option<usize> {
        let mut t = target.clone();
        normalise(&mut t).ok()?;
        if self.entries.contains_key(&t.key()) {
            return None;
        }
        Some(
            self.entries
                .values()
                .filter(|e| e.target.ips == t.ips)
                .count(),
        )
    }

    /// Register (upsert). Returns whether a watcher-visible field changed.
    pub fn register(
        &mut self,
        mut target: Target,
        config: &NspConfig,
        now: Instant,
    ) -> Result<bool, RegistryError> {
        normalise(&mut target)?;
        let key = target.key();
        let known = self.entries.get(&key).map(|e| &e.target);
        if known.is_none() {
            // Meridio's rule: a new target has to be enabled by a second Register.
            target.status = Status::Disabled;
        }
        if let (Kind::Default, Some(path)) = (target.kind, &target.stream) {
            let stream = config
                .stream(path)
                .ok_or_else(|| RegistryError::UnknownStream(path.full_name()))?;
            let max_targets = stream.max_targets;
            if let Some(value) = target.context.get(IDENTIFIER) {
                match value.parse::<u32>() {
                    // Kept in one spelling ("01" is 1), as the cluster's
                    // records and claims need it (found by a review).
                    Ok(id) if (1..=max_targets).contains(&id) => {
                        target.context.insert(IDENTIFIER.into(), id.to_string());
                    }
                    _ => {
                        return Err(RegistryError::BadIdentifier {
                            stream: path.full_name(),
                            value: value.clone(),
                            max_targets,
                        })
                    }
                }
            }
            let others = || {
                self.entries
                    .iter()
                    .filter(|(k, e)| **k != key && e.target.stream.as_ref() == Some(path))
                    .filter(|(_, e)| e.target.kind == Kind::Default)
                    .map(|(_, e)| &e.target)
            };
            if known.is_none() && others().count() >= max_targets as usize {
                return Err(RegistryError::Full {
                    stream: path.full_name(),
                    max_targets,
                });
            }
            if target.status == Status::Enabled {
                if let Some(id) = target.identifier() {
                    if others().any(|o| o.status == Status::Enabled && o.identifier() == Some(id)) {
                        return Err(RegistryError::Collision {
                            stream: path.full_name(),
                            identifier: id,
                        });
                    }
                }
            }
        }
        let changed = known != Some(&target);
        let expires = now + self.expiry;
        self.entries.insert(key, Entry { target, expires });
        Ok(changed)
    }

    /// Puts the ENABLED target `key` holding `id` back to DISABLED (another
    /// node won the identifier); true if it was.
    pub fn disable(&mut self, key: &str, id: u32) -> bool {
        match self.entries.get_mut(key) {
            Some(e) if e.target.status == Status::Enabled && e.target.identifier() == Some(id) => {
                e.target.status = Status::Disabled;
                true
            }
            _ => false,
        }
    }

    /// Unregister; true when the target was there.
    pub fn unregister(&mut self, mut target: Target) -> Result<bool, RegistryError> {
        normalise(&mut target)?;
        Ok(self.entries.remove(&target.key()).is_some())
    }

    /// Removes targets whose ips are `ips` (a conduit that went away).
    pub fn remove_ips(&mut self, ips: &[String]) -> bool {
        let mut ips = ips.to_vec();
        ips.sort();
        let before = self.entries.len();
        self.entries.retain(|_, e| e.target.ips != ips);
        self.entries.len() != before
    }

    /// Removes the entries whose deadline passed; true if any was removed.
    pub fn expire(&mut self, now: Instant) -> bool {
        let before = self.entries.len();
        self.entries.retain(|_, e| e.expires > now);
        self.entries.len() != before
    }
}

/// A target another node published is used as its registry stored it:
/// ips canonical (valid, sorted, once each), an identifier a number from 1.
pub fn well_formed(target: &Target) -> Result<(), RegistryError> {
    let mut t = target.clone();
    normalise(&mut t)?;
    if t.ips != target.ips {
        return Err(RegistryError::NotCanonical(target.ips.clone()));
    }
    // One spelling per number: "01" and "1" would be two claims' keys.
    match (target.context.get(IDENTIFIER), target.identifier()) {
        (Some(value), Some(id)) if id >= 1 && *value == id.to_string() => Ok(()),
        (None, _) => Ok(()),
        (Some(value), _) => Err(RegistryError::NotAnIdentifier(value.clone())),
    }
}

fn normalise(target: &mut Target) -> Result<(), RegistryError> {
    if target.ips.is_empty() {
        return Err(RegistryError::NoIps);
    }
    for ip in &mut target.ips {
        let cidr: Prefix = ip.parse().map_err(|_| RegistryError::BadIp(ip.clone()))?;
        *ip = cidr.to_string();
    }
    target.ips.sort();
    target.ips.dedup();
    if target.kind == Kind::Default && target.stream.is_none() {
        return Err(RegistryError::NoStream);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> NspConfig {
        let mut c: NspConfig = toml::from_str(
            r#"
            [[trenches]]
            name = "t"
            [[conduits]]
            name = "c"
            [[streams]]
            name = "s"
            conduit = "c"
            max_targets = 2
            "#,
        )
        .unwrap();
        c.fill_trenches();
        c
    }

    fn target(ip: &str, id: &str, status: Status) -> Target {
        Target {
            ips: vec![ip.into()],
            context: [(IDENTIFIER.to_string(), id.to_string())].into(),
            status,
            kind: Kind::Default,
            stream: Some(StreamPath {
                trench: "t".into(),
                conduit: "c".into(),
                stream: "s".into(),
            }),
        }
    }

    /// Found by a tester: another node's target with identifier "01" was
    /// listed as such beside the claim of "1".
    #[test]
    fn an_identifier_has_one_spelling() {
        let ok = target("172.16.0.2/24", "1", Status::Enabled);
        assert_eq!(well_formed(&ok), Ok(()));
        for id in ["01", "+1", " 1", "0", "x"] {
            let t = target("172.16.0.2/24", id, Status::Enabled);
            assert_eq!(
                well_formed(&t),
                Err(RegistryError::NotAnIdentifier(id.into())),
                "{id:?}"
            );
        }
    }

    /// A local target registered as "01" is kept as "1": the spelling the
    /// other nodes accept (found by a review).
    #[test]
    fn a_registered_identifier_is_kept_in_one_spelling() {
        let (c, now) = (config(), Instant::now());
        let mut r = Registry::new(Duration::from_secs(60));
        r.register(target("198.18.0.2/24", "01", Status::Enabled), &c, now)
            .unwrap();
        let kept = &r.targets()[0];
        assert_eq!(kept.context[IDENTIFIER], "1");
        assert_eq!(well_formed(kept), Ok(()));
    }

    #[test]
    fn a_new_target_starts_disabled_and_a_second_register_enables_it() {
        let (c, now) = (config(), Instant::now());
        let mut r = Registry::new(Duration::from_secs(60));
        assert!(r
            .register(target("198.18.0.2/24", "1", Status::Enabled), &c, now)
            .unwrap());
        assert_eq!(r.targets()[0].status, Status::Disabled);
        assert!(r
            .register(target("198.18.0.2/24", "1", Status::Enabled), &c, now)
            .unwrap());
        assert_eq!(r.targets()[0].status, Status::Enabled);
        // A refresh with nothing new is not a change.
        assert!(!r
            .register(target("198.18.0.2/24", "1", Status::Enabled), &c, now)
            .unwrap());
    }

    #[test]
    fn entries_expire_unless_refreshed() {
        let (c, t0) = (config(), Instant::now());
        let mut r = Registry::new(Duration::from_secs(60));
        r.register(target("198.18.0.2/24", "1", Status::Disabled), &c, t0)
            .unwrap();
        r.register(target("198.18.0.6/24", "2", Status::Disabled), &c, t0)
            .unwrap();
        let t1 = t0 + Duration::from_secs(40);
        r.register(target("198.18.0.6/24", "2", Status::Disabled), &c, t1)
            .unwrap();
        assert!(!r.expire(t0 + Duration::from_secs(59)));
        assert!(r.expire(t0 + Duration::from_secs(61)));
        assert_eq!(r.targets().len(), 1);
        assert_eq!(r.targets()[0].ips, vec!["198.18.0.6/24"]);
    }

    #[test]
    fn bad_input_is_refused_and_nothing_is_registered() {
        let (c, now) = (config(), Instant::now());
        let mut r = Registry::new(Duration::from_secs(60));
        let err = |r: &mut Registry, t| r.register(t, &c, now).unwrap_err().to_string();
        assert!(err(&mut r, target("198.18.0.2/24", "3", Status::Disabled)).contains("1..=2"));
        assert!(err(&mut r, target("198.18.0.2/24", "x", Status::Disabled)).contains("\"x\""));
        assert!(err(&mut r, target("nonsense", "1", Status::Disabled)).contains("CIDR"));
        let mut unknown = target("198.18.0.2/24", "1", Status::Disabled);
        unknown.stream.as_mut().unwrap().stream = "nope".into();
        assert_eq!(
            err(&mut r, unknown),
            "stream \"nope.c.t\" is not defined in the configuration"
        );
        assert!(r.targets().is_empty());

        r.register(target("198.18.0.2/24", "1", Status::Disabled), &c, now)
            .unwrap();
        r.register(target("198.18.0.6/24", "2", Status::Disabled), &c, now)
            .unwrap();
        assert!(
            err(&mut r, target("198.18.0.10/24", "1", Status::Disabled)).contains("already has 2")
        );
        // Two enabled targets may not share an identifier.
        r.register(target("198.18.0.2/24", "1", Status::Enabled), &c, now)
            .unwrap();
        assert!(
            err(&mut r, target("198.18.0.6/24", "1", Status::Enabled)).contains("already enabled")
        );
        assert_eq!(r.targets().len(), 2);
    }

    #[test]
    fn a_lost_identifier_disables_only_the_target_enabled_with_it() {
        let (c, now) = (config(), Instant::now());
        let mut r = Registry::new(Duration::from_secs(60));
        let t = target("198.18.0.2/24", "1", Status::Enabled);
        r.register(t.clone(), &c, now).unwrap();
        let key = r.targets()[0].key();
        assert!(!r.disable(&key, 1), "still DISABLED");
        r.register(t.clone(), &c, now).unwrap();
        assert!(!r.disable(&key, 2), "another identifier");
        assert!(!r.disable("no such key", 1));
        assert_eq!(r.targets()[0].status, Status::Enabled);
        assert!(r.disable(&key, 1));
        assert_eq!(r.targets()[0].status, Status::Disabled);
        // Enabling it again is a change its owner may make.
        assert!(r.register(t, &c, now).unwrap());
        assert_eq!(r.targets()[0].status, Status::Enabled);
    }
}
