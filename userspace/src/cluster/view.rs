//! The cluster as this node last read it from etcd: node records, every
//! node's targets and the identifier claims. Pure: fed the listed or
//! watched keys, it says whether anything changed; a value that does not
//! parse is skipped, counted once per (key, revision) and logged once per key.
//! What it keeps of bad keys is bounded: their hashes, not the keys
//! (etcd takes keys of a megabyte).

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};

use super::record::{self, Key, Keys, NodeRecord, TargetRecord};

#[derive(Clone, Debug, Default)]
pub struct View {
    pub nodes: BTreeMap<String, NodeRecord>,
    /// By (trench, node, target key).
    pub targets: BTreeMap<(String, String, String), TargetRecord>,
    /// Claim key → owner (`<node>/<target key>`).
    pub claims: BTreeMap<String, String>,
    /// Bad values seen: how many, and the (key hash, mod revision) of the
    /// last [`REMEMBERED`] (a re-list must not count them again).
    bad: usize,
    seen: BTreeSet<(u64, i64)>,
    /// Hashes of the keys logged (at most [`REMEMBERED`]).
    logged: BTreeSet<u64>,
}

/// Bad keys remembered; past it, the sets start again (a key may then be
/// counted or logged a second time).
const REMEMBERED: usize = 4096;

/// Bytes of a bad key that a log line shows.
const SHOWN: usize = 200;

fn hash(key: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    key.hash(&mut h);
    h.finish()
}

/// A key as a log line shows it: at most [`SHOWN`] bytes.
fn shown(key: &[u8]) -> String {
    let text = String::from_utf8_lossy(&key[..key.len().min(SHOWN)]).into_owned();
    if key.len() > SHOWN {
        format!("{text}… ({} bytes)", key.len())
    } else {
        text
    }
}

impl View {
    pub fn bad_values(&self) -> usize {
        self.bad
    }

    /// A key was put; true if the view changed.
    pub fn put(&mut self, keys: &Keys, key: &[u8], value: &[u8], revision: i64) -> bool {
        let parsed = match keys.parse(key) {
            Some(Key::Node(name)) => record::parse_node(&name, value).map(|r| {
                let changed = self.nodes.get(&name) != Some(&r);
                self.nodes.insert(name, r);
                changed
            }),
            Some(Key::Target {
                trench,
                node,
                key: k,
            }) => record::parse_target(&trench, &node, &k, value).map(|r| {
                let id = (trench, node, k);
                let changed = self.targets.get(&id) != Some(&r);
                self.targets.insert(id, r);
                changed
            }),
            Some(Key::Id) => match std::str::from_utf8(value) {
                Ok(owner) => {
                    let k = String::from_utf8_lossy(key).into_owned();
                    let changed = self.claims.get(&k).map(String::as_str) != Some(owner);
                    self.claims.insert(k, owner.into());
                    Ok(changed)
                }
                Err(_) => Err(record::BadValue("not UTF-8".into())),
            },
            None => Err(record::BadValue("not a key of the cluster".into())),
        };
        match parsed {
            Ok(changed) => changed,
            Err(e) => {
                let h = hash(key);
                if self.seen.len() >= REMEMBERED {
                    self.seen.clear();
                }
                if self.seen.insert((h, revision)) {
                    self.bad += 1;
                }
                if self.logged.len() >= REMEMBERED {
                    self.logged.clear();
                }
                if self.logged.insert(h) {
                    tracing::warn!(
                        "cluster: skipping {:?}: {} (logged once per key)",
                        shown(key),
                        e.0
                    );
                }
                // A good value it replaced is gone.
                self.delete(keys, key)
            }
        }
    }

    /// A key was deleted; true if the view changed.
    pub fn delete(&mut self, keys: &Keys, key: &[u8]) -> bool {
        match keys.parse(key) {
            Some(Key::Node(name)) => self.nodes.remove(&name).is_some(),
            Some(Key::Target { trench, node, key }) => {
                self.targets.remove(&(trench, node, key)).is_some()
            }
            Some(Key::Id) => self
                .claims
                .remove(String::from_utf8_lossy(key).as_ref())
                .is_some(),
            None => false,
        }
    }

    /// A full listing (after a connect or a compaction): the view becomes
    /// exactly it; true if anything differs from before.
    pub fn replace<'a>(
        &mut self,
        keys: &Keys,
        listing: impl IntoIterator<Item = (&'a [u8], &'a [u8], i64)>,
    ) -> bool {
        let mut next = View {
            bad: self.bad,
            seen: std::mem::take(&mut self.seen),
            logged: std::mem::take(&mut self.logged),
            ..View::default()
        };
        for (key, value, revision) in listing {
            next.put(keys, key, value, revision);
        }
        let changed =
            next.nodes != self.nodes || next.targets != self.targets || next.claims != self.claims;
        *self = next;
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Keys {
        Keys {
            prefix: "/p/".into(),
        }
    }

    fn node(name: &str, last: u8) -> Vec<u8> {
        serde_json::to_vec(&NodeRecord {
            name: name.into(),
            tunnel_addresses: vec![std::net::Ipv4Addr::new(198, 51, 100, last)],
            conduit_prefixes: vec![],
            container_subnets: vec![],
            pod_cidrs: vec![],
            version: "v".into(),
        })
        .unwrap()
    }

    #[test]
    fn bad_values_are_skipped_counted_and_replace_a_good_one() {
        let (k, mut v) = (keys(), View::default());
        assert!(v.put(&k, b"/p/nodes/n1", &node("n1", 1), 5));
        assert!(!v.put(&k, b"/p/nodes/n1", &node("n1", 1), 6));
        // A corrupt value for n1: n1 is gone, the value counted.
        assert!(v.put(&k, b"/p/nodes/n1", b"\x00garbage", 7));
        assert!(v.nodes.is_empty());
        assert!(!v.put(&k, b"/p/nodes/n2", &node("n1", 2), 8));
        assert!(!v.put(&k, b"/p/foreign", b"x", 9));
        assert_eq!(v.bad_values(), 3);
        // Seen again at the same revision (a re-list): not counted twice.
        v.replace(&k, [(&b"/p/foreign"[..], &b"x"[..], 9)]);
        assert_eq!(v.bad_values(), 3);
    }

    #[test]
    fn a_record_under_another_trench_leaves_the_real_one() {
        let k = keys();
        let target = crate::cluster::record::tests::target();
        let record = serde_json::to_vec(&TargetRecord {
            node: "n2".into(),
            target: target.clone(),
            served: true,
        })
        .unwrap();
        let real = k.target("n2", &target).unwrap();
        let stray = real.replace("/targets/t/", "/targets/other/");
        let mut v = View::default();
        assert!(v.put(&k, real.as_bytes(), &record, 5));
        // The same value, or garbage, under another trench: skipped, counted.
        assert!(!v.put(&k, stray.as_bytes(), &record, 6));
        assert!(!v.put(&k, stray.as_bytes(), b"garbage", 7));
        assert!(!v.delete(&k, stray.as_bytes()));
        assert_eq!(v.targets.len(), 1);
        assert_eq!(v.bad_values(), 2);
    }

    #[test]
    fn bad_keys_are_counted_without_being_kept() {
        let (k, mut v) = (keys(), View::default());
        let big = vec![b'x'; 100_000];
        for i in 0..(REMEMBERED as i64 + 10) {
            let mut key = b"/p/zz/".to_vec();
            key.extend_from_slice(&big);
            key.extend_from_slice(i.to_string().as_bytes());
            v.put(&k, &key, b"v", i);
        }
        assert_eq!(v.bad_values(), REMEMBERED + 10);
        assert!(v.seen.len() <= REMEMBERED && v.logged.len() <= REMEMBERED);
        assert_eq!(shown(&big).len(), SHOWN + "… (100000 bytes)".len());
    }

    #[test]
    fn a_relist_applies_only_the_difference() {
        let (k, mut v) = (keys(), View::default());
        let (n1, n2) = (node("n1", 1), node("n2", 2));
        assert!(v.replace(
            &k,
            [
                (&b"/p/nodes/n1"[..], &n1[..], 1),
                (&b"/p/nodes/n2"[..], &n2[..], 2)
            ]
        ));
        assert!(!v.replace(
            &k,
            [
                (&b"/p/nodes/n2"[..], &n2[..], 2),
                (&b"/p/nodes/n1"[..], &n1[..], 1)
            ]
        ));
        assert!(v.replace(&k, [(&b"/p/nodes/n2"[..], &n2[..], 2)]));
        assert_eq!(v.nodes.keys().collect::<Vec<_>>(), ["n2"]);
        assert!(v.delete(&k, b"/p/nodes/n2"));
        assert!(!v.delete(&k, b"/p/nodes/n2"));
    }
}
