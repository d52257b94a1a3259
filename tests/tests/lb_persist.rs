//! LB changes made through the admin API survive a restart, as tap flows
//! do (issue 20: they vanished). A restart with an edited LB file takes the
//! file instead: the operator changed it since.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use tapmesh::lb::model::LbSpec;
use tapmesh_tests::{
    kernel_tests_enabled,
    net::{flow, send_udp_flows, stream, vip, wait_until, LbLab, UdpReceiver, CLIENT},
    TempDir,
};

const DST: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);

/// 200 flows to the VIP: datagrams received by each target.
fn spread(lab: &LbLab) -> Vec<u64> {
    let dst = SocketAddrV4::new(DST, 7000);
    let receivers: Vec<UdpReceiver> = lab
        .targets
        .iter()
        .map(|t| UdpReceiver::start(&t.netns.name, dst))
        .collect();
    let ports: Vec<u16> = (31_000..31_200).collect();
    let sent = send_udp_flows(&lab.client.name, CLIENT, &ports, dst, 1, &[0x5a; 32]);
    assert_eq!(sent, 200);
    wait_until(Duration::from_secs(5), || {
        receivers.iter().map(UdpReceiver::count).sum::<u64>() >= sent
    });
    receivers.into_iter().map(|r| r.stop().total()).collect()
}

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
    assert_eq!(spread(&lab), vec![200, 0], "the file's one target");
    lab.set_target(&lab.targets[1].local("s", 2)).unwrap();
    let changed = lab.list().config.expect("config");
    assert_eq!(changed.targets.len(), 2);
    let before = spread(&lab);
    assert_eq!(before.iter().sum::<u64>(), 200);
    assert!(before.iter().all(|&n| n > 0), "both targets: {before:?}");

    // Same file: the admin API's target is back, and takes the same flows.
    lab.stop();
    lab.start_with(Some(&file), &state_arg);
    assert_eq!(lab.list().config.expect("config"), changed);
    assert_eq!(spread(&lab), before, "the same split after the restart");

    // An edited file wins over the saved changes.
    let mut edited = file.clone();
    edited.flows[0].protocols = vec!["udp".into(), "tcp".into()];
    lab.stop();
    lab.start_with(Some(&edited), &state_arg);
    let config = lab.list().config.expect("config");
    assert_eq!(config, tapmesh::admin::lb_config(edited));
    assert_eq!(spread(&lab), vec![200, 0]);
}
