//! The mirror maps' entries for validated tap flows: pure, no maps.

use std::collections::BTreeSet;

use tapmesh_common::mirror::{MirrorPort, MirrorRule, VlanSet, RULES_PER_PORT};

use super::model::{parse_vlan_filter, MirrorError, TapFlow};
pub use crate::dataplane::mirror::MirrorTables;

/// A tap flow with the indexes the daemon gave it and its service's
/// destination.
pub struct FlowRule<'a> {
    pub spec: &'a TapFlow,
    /// Index of its VLAN set and counters.
    pub index: u32,
    pub source_ifindex: u32,
    pub dest_ifindex: u32,
    /// The mirror ring fed through `tm_mirror_copy` (no interface then):
    /// its slot and generation.
    pub ring: Option<(u32, u8)>,
}

/// The rules per source interface and the VLAN sets, with the source
/// interfaces that need the copy programs. A port holds `RULES_PER_PORT`
/// rules; flows beyond that are left out.
pub fn mirror_tables<'a>(
    flows: impl IntoIterator<Item = FlowRule<'a>>,
) -> Result<(MirrorTables, BTreeSet<&'a str>), MirrorError> {
    let mut tables = MirrorTables::default();
    let mut sources = BTreeSet::new();
    for f in flows {
        let port = tables
            .ports
            .entry(f.source_ifindex)
            .or_insert_with(MirrorPort::default);
        let slot = port.count as usize;
        if slot >= RULES_PER_PORT {
            continue;
        }
        let filtered = f.spec.vlan_filter.is_some();
        if let Some(filter) = &f.spec.vlan_filter {
            let mut set = VlanSet::default();
            for (a, b) in parse_vlan_filter(filter)? {
                for v in a..=b {
                    set.insert(v);
                }
            }
            tables.vlans.insert(f.index, set);
        }
        port.rules[slot] = MirrorRule {
            flow: f.index,
            dest_ifindex: f.dest_ifindex,
            directions: f.spec.direction.bits(),
            vlan_filtered: filtered as u8,
            ring: f.ring.map_or(0, |(slot, _)| slot as u8 + 1),
            generation: f.ring.map_or(0, |(_, generation)| generation),
        };
        port.count += 1;
        sources.insert(f.spec.source.as_str());
    }
    Ok((tables, sources))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mirror::model::Direction;

    fn flow(id: &str, source: &str, vlans: Option<&str>) -> TapFlow {
        TapFlow {
            id: id.into(),
            name: id.into(),
            tap_service: "s".into(),
            source: source.into(),
            direction: Direction::Both,
            vlan_filter: vlans.map(String::from),
        }
    }

    #[test]
    fn rules_per_source_with_vlan_sets_and_a_full_port() {
        let flows: Vec<TapFlow> = (0..=RULES_PER_PORT as u32)
            .map(|i| flow(&format!("f{i}"), "a", (i == 0).then_some("10,20-21")))
            .chain([flow("b", "b", None)])
            .collect();
        let rules = flows.iter().enumerate().map(|(i, f)| FlowRule {
            spec: f,
            index: i as u32,
            source_ifindex: if f.source == "a" { 7 } else { 8 },
            dest_ifindex: 9,
            ring: None,
        });
        let (tables, sources) = mirror_tables(rules).unwrap();
        assert_eq!(sources, BTreeSet::from(["a", "b"]));
        let a = &tables.ports[&7];
        assert_eq!(a.count as usize, RULES_PER_PORT);
        assert_eq!(a.rules[0].vlan_filtered, 1);
        assert_eq!(a.rules[1].vlan_filtered, 0);
        assert_eq!(a.rules[RULES_PER_PORT - 1].flow, RULES_PER_PORT as u32 - 1);
        let b = &tables.ports[&8];
        assert_eq!(
            (b.count, b.rules[0].flow, b.rules[0].dest_ifindex),
            (1, RULES_PER_PORT as u32 + 1, 9)
        );
        assert_eq!(tables.vlans.keys().copied().collect::<Vec<_>>(), vec![0]);
        let mut want = VlanSet::default();
        for v in [10, 20, 21] {
            want.insert(v);
        }
        assert_eq!(tables.vlans[&0], want);
    }

    #[test]
    fn a_bad_vlan_filter_refuses_the_tables() {
        let f = flow("f", "a", Some("20-10"));
        let rule = FlowRule {
            spec: &f,
            index: 0,
            source_ifindex: 7,
            dest_ifindex: 9,
            ring: None,
        };
        assert!(mirror_tables([rule]).is_err());
    }
}
