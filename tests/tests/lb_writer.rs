//! What the LB writer leaves in the maps over successive updates of one
//! large stream (tables and targets are written in batches, a table of the
//! same size only where it differs from the spare region): every entry of the
//! published Maglev region leads to the target its slot names, with that
//! target's MACs and interface, and each interface is resolved once per update.

use std::cell::RefCell;

use aya::maps::{Array, MapData};
use tapmesh::{
    dataplane::lb::{LbWriter, TunnelSettings},
    lb::flows::{FlowSpec, VipSpec},
    lb::model::{validate, LbSpec, StreamSpec, TargetSpec, TargetVia, ValidLb, ValidVia},
};
use tapmesh_common::{
    lb::{StreamValue, Target, MAX_STREAMS, NO_TARGET, TARGET_LOCAL},
    map_names as n,
};
use tapmesh_tests::{bpf::Bpf, kernel_tests_enabled};

const MAX_TARGETS: u32 = 300;

/// Targets `identifiers` of stream "s" (`MAX_TARGETS` slots), on `if1`
/// (odd) and `if2` (even), with MACs that depend on `generation`.
fn spec(identifiers: impl Iterator<Item = u32>, generation: u8) -> LbSpec {
    sized(MAX_TARGETS, identifiers, generation)
}

fn sized(max_targets: u32, identifiers: impl Iterator<Item = u32>, generation: u8) -> LbSpec {
    LbSpec {
        vips: vec![VipSpec {
            name: "v".into(),
            address: "20.0.0.1".into(),
        }],
        streams: vec![StreamSpec {
            name: "s".into(),
            max_targets,
            table_size: None,
            port_nats: Vec::new(),
        }],
        flows: vec![FlowSpec {
            name: "all".into(),
            vips: vec!["v".into()],
            stream: "s".into(),
            ..Default::default()
        }],
        targets: identifiers
            .map(|i| TargetSpec {
                stream: "s".into(),
                identifier: i,
                via: TargetVia::Local {
                    interface: format!("if{}", 2 - i % 2),
                    mac: format!("02:{generation:02x}:00:00:{:02x}:{:02x}", i >> 8, i & 0xff),
                },
            })
            .collect(),
    }
}

/// The fake resolver's answer for `if<n>`.
fn interface(name: &str) -> (u32, [u8; 6]) {
    let n: u8 = name[2..].parse().expect("if<n>");
    (100 + u32::from(n), [2, 0xee, 0, 0, 0, n])
}

fn array<'a, V: aya::Pod>(bpf: &'a Bpf, name: &str) -> Array<&'a MapData, V> {
    Array::try_from(bpf.ebpf.map(name).expect(name)).expect(name)
}

/// Applies `spec` and checks the maps against it; returns the interfaces
/// the writer asked the resolver for.
fn apply_and_check(bpf: &mut Bpf, writer: &mut LbWriter, spec: &LbSpec) -> Vec<String> {
    let valid = validate(spec).expect("valid");
    let asked = RefCell::new(Vec::new());
    let resolve = |name: &str| {
        asked.borrow_mut().push(name.to_string());
        Ok(interface(name))
    };
    writer
        .apply(&mut bpf.ebpf, &valid, TunnelSettings::default(), &resolve)
        .expect("apply");
    check(bpf, &valid);
    asked.into_inner()
}

fn check(bpf: &Bpf, valid: &ValidLb) {
    let streams = array::<StreamValue>(bpf, n::STREAMS);
    let maglev = array::<u32>(bpf, n::MAGLEV);
    let targets = array::<Target>(bpf, n::TARGETS);
    let tables: Vec<StreamValue> = (0..MAX_STREAMS)
        .map(|i| streams.get(&i, 0).expect("stream entry"))
        .filter(|s| s.table_size != 0)
        .collect();
    let want = &valid.streams[0].table;
    assert_eq!(tables.len(), 1, "one stream with a table: {tables:?}");
    assert_eq!(tables[0].table_size as usize, want.len());
    let base = tables[0].table_base;
    for (i, &slot) in want.iter().enumerate() {
        let entry = maglev.get(&(base + i as u32), 0).expect("Maglev entry");
        if slot == NO_TARGET {
            assert_eq!(entry, NO_TARGET, "entry {i}");
            continue;
        }
        let t = valid
            .targets
            .iter()
            .find(|t| t.identifier == slot + 1)
            .expect("the slot's target");
        let ValidVia::Local {
            interface: name,
            mac,
        } = &t.via
        else {
            panic!("local targets only");
        };
        let (ifindex, our_mac) = interface(name);
        let got = targets.get(&entry, 0).expect("target entry");
        assert_eq!(
            (
                got.kind,
                got.ifindex,
                got.dst_mac,
                got.src_mac,
                got.stats_index
            ),
            (TARGET_LOCAL, ifindex, *mac, our_mac, entry),
            "entry {i} (slot {slot})"
        );
    }
}

#[test]
fn tables_and_targets_follow_updates_and_interfaces_resolve_once() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut bpf = Bpf::load();
    let mut writer = LbWriter::default();
    let once = vec!["if1".to_string(), "if2".to_string()];

    let mut asked = apply_and_check(&mut bpf, &mut writer, &spec(1..=MAX_TARGETS, 1));
    asked.sort();
    assert_eq!(asked, once, "each interface once per update");
    // Every MAC changes, the table does not.
    apply_and_check(&mut bpf, &mut writer, &spec(1..=MAX_TARGETS, 2));
    // Half the targets leave: a new table in a new region.
    apply_and_check(
        &mut bpf,
        &mut writer,
        &spec((1..=MAX_TARGETS).step_by(2), 2),
    );
    // They come back, and every MAC changes again.
    apply_and_check(&mut bpf, &mut writer, &spec(1..=MAX_TARGETS, 3));
    // No targets: the table holds no target.
    apply_and_check(&mut bpf, &mut writer, &spec(std::iter::empty(), 3));
    // All but one: the spare region held the first table, so only the
    // entries that differ from it are written.
    apply_and_check(&mut bpf, &mut writer, &spec(2..=MAX_TARGETS, 3));
    apply_and_check(&mut bpf, &mut writer, &spec(1..=MAX_TARGETS, 3));
    // Another size: new regions, the spare of the old size given back.
    let bigger = MAX_TARGETS + 7;
    apply_and_check(&mut bpf, &mut writer, &sized(bigger, 1..=bigger, 4));
    apply_and_check(&mut bpf, &mut writer, &sized(bigger, 2..=bigger, 4));
    apply_and_check(&mut bpf, &mut writer, &sized(bigger, 1..=bigger, 5));
}
