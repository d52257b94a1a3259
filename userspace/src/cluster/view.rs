//! The cluster as this node last read it from etcd: node records, every
//! node's targets and the identifier claims. Pure: fed the listed or
//! watched keys, it says whether anything changed; a value that does not
//! parse is skipped, counted once per (key, revision) and logged once per key.

use std::collections::{BTreeMap, BTreeSet};

use super::record::{self, Key, Keys, NodeRecord, TargetRecord};

#[derive(Clone, Debug, Default)]
pub struct View {
    pub nodes: BTreeMap<String, NodeRecord>,
    /// By (node, target key).
    pub targets: BTreeMap<(String, String), TargetRecord>,
    /// Claim key → owner (`<node>/<target key>`).
    pub claims: BTreeMap<String, String>,
    /// Bad values seen, by (key, mod revision).
    bad: BTreeSet<(Vec<u8>, i64)>,
    logged: BTreeSet<Vec<u8>>,
}

impl View {
    pub fn bad_values(&self) -> usize {
        self.bad.len()
    }

    /// A key was put; true if the view changed.
    pub fn put(&mut self, keys: &Keys, key: &[u8], value: &[u8], revision: i64) -> bool {
        let parsed = match keys.parse(key) {
            Some(Key::Node(name)) => record::parse_node(&name, value).map(|r| {
                let changed = self.nodes.get(&name) != Some(&r);
                self.nodes.insert(name, r);
                changed
            }),
            Some(Key::Target { node, key: k }) => record::parse_target(&node, &k, value).map(|r| {
                let id = (node, k);
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
                self.bad.insert((key.to_vec(), revision));
                if self.logged.insert(key.to_vec()) {
                    tracing::warn!(
                        "cluster: skipping {:?}: {} (logged once per key)",
                        String::from_utf8_lossy(key),
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
            Some(Key::Target { node, key }) => self.targets.remove(&(node, key)).is_some(),
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
            bad: std::mem::take(&mut self.bad),
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
