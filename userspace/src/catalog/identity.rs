//! Maglev identifiers of EDS backends, keyed by address and port.
//!
//! A backend keeps the identifiers it holds for as long as it stays in its
//! cluster, whatever the order of the endpoints in later updates, and across
//! restarts (the catalog saves them in the state directory). So removing one
//! of N backends frees only its identifiers and moves only about 1/N of the
//! stream's Maglev entries; with identifiers given by position, removing the
//! first one renumbered every other backend and moved nearly all of them.
//!
//! New backends (and backends that need more identifiers after a weight
//! change) take the lowest free identifiers, in address order, so nodes that
//! see the same updates assign the same identifiers. A backend that needs
//! fewer keeps its lowest ones. When the identifiers in use are sparse (the
//! highest needs a table more than twice the size the count needs) they are
//! renumbered 1.. in their order, once, so a cluster that shrank a lot does
//! not keep a large, mostly empty table.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::stream_size;

/// The identifiers of every backend, by cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identities {
    pub clusters: BTreeMap<String, BTreeMap<SocketAddr, Vec<u32>>>,
}

impl Identities {
    /// Gives each backend of `cluster` as many identifiers as it wants
    /// (`wanted`: address and count, a backend once), keeping what it holds;
    /// forgets backends no longer wanted. Returns each backend's identifiers,
    /// in the order of `wanted`.
    pub fn assign(&mut self, cluster: &str, wanted: &[(SocketAddr, u32)]) -> Vec<&[u32]> {
        let held = self.clusters.remove(cluster).unwrap_or_default();
        // Each backend once, in address order, with all it wants.
        let mut count: Vec<(SocketAddr, u32)> = wanted.to_vec();
        count.sort_unstable_by_key(|&(address, _)| address);
        count.dedup_by(|later, kept| {
            let same = later.0 == kept.0;
            if same {
                kept.1 += later.1;
            }
            same
        });
        // `held` and `count` are both in address order: one walk pairs them.
        let mut held = held.into_iter().peekable();
        let mut used = Vec::new();
        let mut ids_of: Vec<Vec<u32>> = count
            .iter()
            .map(|(address, n)| {
                while held.next_if(|(a, _)| a < address).is_some() {}
                let mut ids = held
                    .next_if(|(a, _)| a == address)
                    .map(|(_, ids)| ids)
                    .unwrap_or_default();
                ids.sort_unstable();
                ids.truncate(*n as usize);
                used.extend(ids.iter().copied());
                ids
            })
            .collect();
        used.sort_unstable();
        let mut taken = used.iter().peekable();
        let mut free = (1u32..).filter(|id| {
            while taken.next_if(|&&t| t < *id).is_some() {}
            taken.peek() != Some(&id)
        });
        for (ids, (_, n)) in ids_of.iter_mut().zip(&count) {
            while ids.len() < *n as usize {
                ids.push(free.next().expect("identifiers left"));
            }
        }
        let total: u32 = count.iter().map(|(_, n)| n).sum();
        let highest = ids_of.iter().flatten().copied().max().unwrap_or(0);
        if stream_size(highest) > 2 * stream_size(total) {
            let mut order: Vec<u32> = ids_of.iter().flatten().copied().collect();
            order.sort_unstable();
            let renumbered: HashMap<u32, u32> = order.into_iter().zip(1u32..).collect();
            for ids in &mut ids_of {
                for id in ids.iter_mut() {
                    *id = renumbered[id];
                }
            }
        }
        let next: BTreeMap<SocketAddr, Vec<u32>> = count
            .iter()
            .map(|&(address, _)| address)
            .zip(ids_of)
            .collect();
        let Some(kept) = (!next.is_empty()).then(|| {
            self.clusters
                .entry(cluster.to_string())
                .insert_entry(next)
                .into_mut()
        }) else {
            return vec![&[]; wanted.len()];
        };
        // Endpoints usually come in address order: `kept`'s order.
        if wanted.windows(2).all(|w| w[0].0 < w[1].0) {
            return kept.values().map(Vec::as_slice).collect();
        }
        wanted
            .iter()
            .map(|(address, _)| kept.get(address).map_or(&[][..], Vec::as_slice))
            .collect()
    }

    /// Forgets clusters that are not in `keep`.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.clusters.retain(|name, _| keep(name));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owned(ids: Vec<&[u32]>) -> Vec<Vec<u32>> {
        ids.into_iter().map(<[u32]>::to_vec).collect()
    }

    fn addr(i: u32) -> SocketAddr {
        SocketAddr::new(std::net::Ipv4Addr::from(0xc612_1000 + i).into(), 8080)
    }

    #[test]
    fn backends_keep_their_identifiers_whatever_the_order() {
        let mut ids = Identities::default();
        let all: Vec<_> = (0..1000).map(|i| (addr(i), 1)).collect();
        let first = owned(ids.assign("svc", &all));
        assert_eq!(first[0], vec![1]);
        assert_eq!(first[999], vec![1000]);
        // The first removed, the rest reversed: each keeps its identifier.
        let rest: Vec<_> = all[1..].iter().rev().copied().collect();
        let second = owned(ids.assign("svc", &rest));
        for (i, got) in second.iter().enumerate() {
            assert_eq!(got, &first[999 - i]);
        }
        // A new backend takes the freed identifier 1.
        let mut more = rest.clone();
        more.push((addr(5000), 1));
        assert_eq!(ids.assign("svc", &more).last().unwrap(), &vec![1]);
    }

    #[test]
    fn weight_changes_keep_the_lowest_and_new_ones_fill_holes_in_address_order() {
        let mut ids = Identities::default();
        let got = ids.assign("svc", &[(addr(2), 3), (addr(1), 2)]);
        // Address order decides, not the order of the update.
        assert_eq!(got, vec![vec![3, 4, 5], vec![1, 2]]);
        let got = ids.assign("svc", &[(addr(2), 1), (addr(1), 3), (addr(3), 2)]);
        assert_eq!(got, vec![vec![3], vec![1, 2, 4], vec![5, 6]]);
        // Another cluster has its own numbering.
        assert_eq!(ids.assign("other", &[(addr(9), 1)]), vec![vec![1]]);
        ids.assign("other", &[]);
        assert!(!ids.clusters.contains_key("other"));
    }

    #[test]
    fn sparse_identifiers_are_renumbered_in_their_order() {
        let mut ids = Identities::default();
        let all: Vec<_> = (0..100).map(|i| (addr(i), 1)).collect();
        ids.assign("svc", &all);
        // 20 left with identifiers up to 100: a table for 128 where 32 do; renumbered.
        let kept: Vec<_> = (0..100).step_by(5).map(|i| (addr(i), 1)).collect();
        let got = ids.assign("svc", &kept);
        assert_eq!(got, (1..=20).map(|i| vec![i]).collect::<Vec<_>>());
        // 50 of 100 left: identifiers kept (64 against 128 is within twice).
        let mut ids = Identities::default();
        ids.assign("svc", &all);
        let half: Vec<_> = (0..100).step_by(2).map(|i| (addr(i), 1)).collect();
        let got = ids.assign("svc", &half);
        assert_eq!(got[49], vec![99]);
    }

    #[test]
    fn identities_survive_a_round_trip_through_json() {
        let mut ids = Identities::default();
        ids.assign(
            "svc",
            &[(addr(1), 2), ("[2001:db8::1]:443".parse().unwrap(), 1)],
        );
        let text = serde_json::to_string(&ids).unwrap();
        assert_eq!(serde_json::from_str::<Identities>(&text).unwrap(), ids);
    }
}
