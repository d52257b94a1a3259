//! LB changes made through the admin API survive a restart, as tap flows
//! do (issue 20: they vanished). A restart with an edited LB file takes the
//! file instead: the operator changed it since.

use std::net::Ipv4Addr;
use std::time::Duration;

use tapmesh::lb::model::LbSpec;
use tapmesh_tests::{
    fmt_mac, kernel_tests_enabled,
    net::{flow, stream, vip, wait_until, LbLab},
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
    let node_mac = fmt_mac(lab.node.mac(&gone));
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

    // The link comes back as a NetManager makes a container's again (same
    // name, same MACs): the target is put back, and takes its flows again.
    let t = &lab.targets[1];
    lab.node.ip(&[
        "link",
        "add",
        &gone,
        "address",
        &node_mac,
        "type",
        "veth",
        "peer",
        "name",
        &t.target_if,
        "address",
        &fmt_mac(t.mac),
        "netns",
        &t.netns.name,
    ]);
    lab.node
        .ip(&["addr", "add", "198.18.11.1/24", "dev", &gone]);
    lab.node.exec(&[
        "sysctl",
        "-qw",
        &format!("net.ipv4.conf.{gone}.rp_filter=0"),
    ]);
    // GRO at the target's end before either end is up: a veth takes XDP
    // frames only if its peer asked for GRO by the time it came up.
    t.netns.exec(&["ethtool", "-K", &t.target_if, "gro", "on"]);
    t.netns.ip(&[
        "addr",
        "add",
        &format!("{}/24", t.address),
        "dev",
        &t.target_if,
    ]);
    t.netns.ip(&["link", "set", &t.target_if, "up"]);
    t.netns
        .ip(&["route", "add", "default", "via", "198.18.11.1"]);
    lab.node.ip(&["link", "set", &gone, "up"]);
    assert!(
        wait_until(Duration::from_secs(30), || lab.list().config.as_ref()
            == Some(&changed)),
        "the target is back: {:?}",
        lab.list().config
    );
    assert_eq!(lab.spread(DST), before, "the split before the link went");

    // A link of that name whose peer has another MAC is another pod's: the
    // target stays out, and the log says why.
    let (target_if, target_ns) = (t.target_if.clone(), t.netns.name.clone());
    lab.stop();
    lab.node.ip(&["link", "del", &gone]);
    lab.start_with(Some(&file), &state_arg);
    assert_eq!(lab.list().config.expect("config"), without);
    lab.node.ip(&[
        "link", "add", &gone, "type", "veth", "peer", "name", &target_if, "netns", &target_ns,
    ]);
    lab.node.ip(&["link", "set", &gone, "up"]);
    assert!(
        wait_until(Duration::from_secs(30), || lab
            .daemon()
            .log_text()
            .contains("is back with another peer MAC")),
        "{}",
        lab.daemon().log_text()
    );
    assert_eq!(lab.list().config.expect("config"), without);
    lab.node.ip(&["link", "del", &gone]);

    // An edited file wins over the saved changes, which are kept aside
    // (an operator tester lost them in a rolling update with an edited
    // ConfigMap, told only at INFO).
    let mut flow = file.flows[0].clone();
    flow.name = "admin".into();
    flow.protocols = vec!["tcp".into()];
    lab.set_flow(&flow).unwrap();
    let saved = std::fs::read(state.0.join("lb-state.json")).unwrap();
    let mut edited = file.clone();
    edited.flows[0].protocols = vec!["udp".into(), "tcp".into()];
    lab.stop();
    lab.start_with(Some(&edited), &state_arg);
    let config = lab.list().config.expect("config");
    assert_eq!(config, tapmesh::admin::lb_config(edited));
    assert_eq!(lab.spread(DST), vec![200, 0]);
    let aside = std::fs::read(state.0.join("lb-state.refused.json")).unwrap();
    assert_eq!(aside, saved, "the admin API's changes, kept");
    assert!(lab.daemon().log_text().contains(&format!(
        "WARN tapmesh::lb::persist: the LB file changed since {} was written: its content replaces the admin API's changes (kept as {})",
        state.0.join("lb-state.json").display(),
        state.0.join("lb-state.refused.json").display()
    )));
}
