//! LB changes made through the admin API survive a restart, as tap flows
//! do (issue 20: they vanished). A restart with an edited LB file takes the
//! file instead: the operator changed it since.

use std::net::Ipv4Addr;

use tapmesh::lb::model::LbSpec;
use tapmesh_tests::{
    kernel_tests_enabled,
    net::{flow, stream, vip, LbLab},
    TempDir,
};

const DST: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);

#[test]
fn admin_changes_survive_a_restart_until_the_file_changes() {
    if !kernel_tests_enabled() {
        return;
    }
    let state = TempDir::new("lbstate");
    let state_arg = ["--state-dir".to_string(), state.0.display().to_string()];
    let mut lab = LbLab::new(2, &[DST]);
    let file = LbSpec {
        vips: vec![vip("v", &DST.to_string())],
        streams: vec![stream("s", 10)],
        flows: vec![flow("all", &["v"], "s", &["udp"])],
        targets: vec![lab.targets[0].local("s", 1)],
    };
    lab.start_with(Some(&file), &state_arg);
    assert_eq!(lab.spread(DST), vec![200, 0], "the file's one target");
    lab.set_target(&lab.targets[1].local("s", 2)).unwrap();
    let changed = lab.list().config.expect("config");
    assert_eq!(changed.targets.len(), 2);
    let before = lab.spread(DST);
    assert_eq!(before.iter().sum::<u64>(), 200);
    assert!(before.iter().all(|&n| n > 0), "both targets: {before:?}");

    // Same file: the admin API's target is back, and takes the same flows.
    lab.stop();
    lab.start_with(Some(&file), &state_arg);
    assert_eq!(lab.list().config.expect("config"), changed);
    assert_eq!(lab.spread(DST), before, "the same split after the restart");

    // The admin API's target's interface goes while the daemon is down: that
    // target is left out, the rest of the saved part still applies, and the
    // whole part is kept aside.
    lab.stop();
    let gone = lab.targets[1].node_if.clone();
    lab.node.ip(&["link", "del", &gone]);
    let saved = std::fs::read(state.0.join("lb-state.json")).unwrap();
    lab.start_with(Some(&file), &state_arg);
    let mut without = changed.clone();
    without.targets.retain(|t| t.identifier != 2);
    assert_eq!(without.targets.len(), 1);
    assert_eq!(lab.list().config.expect("config"), without);
    // The whole saved part is kept aside for the operator.
    let aside = std::fs::read(state.0.join("lb-state.refused.json")).unwrap();
    assert_eq!(aside, saved);
    assert_eq!(lab.spread(DST), vec![200, 0]);

    // An edited file wins over the saved changes.
    let mut edited = file.clone();
    edited.flows[0].protocols = vec!["udp".into(), "tcp".into()];
    lab.stop();
    lab.start_with(Some(&edited), &state_arg);
    let config = lab.list().config.expect("config");
    assert_eq!(config, tapmesh::admin::lb_config(edited));
    assert_eq!(lab.spread(DST), vec![200, 0]);
}
