//! A local target behind a veth whose peer has GRO off (issue 20): native
//! XDP redirect into the veth dropped every frame silently. The daemon now
//! turns GRO on at the peer (in the target's namespace) when the target is
//! added, and refuses, saying why, a veth whose peer it cannot reach.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use tapmesh::lb::model::{LbSpec, TargetVia};
use tapmesh_tests::{
    kernel_tests_enabled,
    maps::{differences, dump_pinned},
    net::{flow, send_udp_flows, stream, vip, wait_until, LbLab, UdpReceiver, CLIENT},
    sh, unique, TempDir,
};

const DST: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);

/// `count` datagrams (one flow each) to the VIP; how many arrived.
fn datagrams(lab: &LbLab, first_port: u16, count: u16) -> u64 {
    let dst = SocketAddrV4::new(DST, 7000);
    let receiver = UdpReceiver::start(&lab.targets[0].netns.name, dst);
    let ports: Vec<u16> = (first_port..first_port + count).collect();
    let sent = send_udp_flows(&lab.client.name, CLIENT, &ports, dst, 1, &[0x5a; 32]);
    assert_eq!(sent, u64::from(count));
    wait_until(Duration::from_secs(30), || receiver.count() >= sent);
    receiver.stop().total()
}

fn gro(lab: &LbLab) -> String {
    let t = &lab.targets[0];
    let out = t.netns.exec(&["ethtool", "-k", &t.target_if]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with("generic-receive-offload:"))
        .unwrap_or_default()
        .to_string()
}

#[test]
fn gro_goes_on_at_a_local_targets_veth_peer_and_an_unreachable_peer_is_refused() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut lab = LbLab::new(1, &[DST]);
    let t = &lab.targets[0];
    // As an application's veth comes: GRO off at its end.
    t.netns.exec(&["ethtool", "-K", &t.target_if, "gro", "off"]);
    assert_eq!(gro(&lab), "generic-receive-offload: off");
    let spec = LbSpec {
        vips: vec![vip("v", &DST.to_string())],
        streams: vec![stream("s", 10)],
        flows: vec![flow("all", &["v"], "s", &["udp"])],
        targets: vec![lab.targets[0].local("s", 1)],
    };
    lab.start(Some(&spec));
    assert_eq!(
        gro(&lab),
        "generic-receive-offload: on",
        "set by the daemon"
    );
    assert_eq!(datagrams(&lab, 33_000, 200), 200);

    // A veth whose peer is in a namespace the daemon cannot enter (no
    // process, no /run/netns name: only a bind mount holds it): refused
    // with the reason, nothing written.
    let hidden = unique("tmh");
    sh("ip", &["netns", "add", &hidden]);
    let holder = TempDir::new("tmhold");
    let held = holder.0.join("ns");
    std::fs::write(&held, b"").unwrap();
    sh(
        "mount",
        &[
            "--bind",
            &format!("/run/netns/{hidden}"),
            held.to_str().unwrap(),
        ],
    );
    sh("ip", &["netns", "del", &hidden]);
    let near = unique("tmv");
    let near_peer = unique("tmp");
    let unmount = Unmount(held.clone());
    lab.node.ip(&[
        "link", "add", &near, "type", "veth", "peer", "name", &near_peer,
    ]);
    lab.node
        .ip(&["link", "set", &near_peer, "netns", held.to_str().unwrap()]);
    let pins = lab
        .daemon()
        .bpffs_root
        .join(format!("v{}", tapmesh_common::SCHEMA_VERSION));
    let maps = dump_pinned(&pins);
    let target = tapmesh_tests::net::target(
        "s",
        2,
        TargetVia::Local {
            interface: near.clone(),
            mac: "02:00:00:00:00:02".into(),
        },
    );
    let message = lab
        .set_target(&target)
        .expect_err("an unreachable veth peer");
    for needle in [near.as_str(), "veth", "gro on"] {
        assert!(message.contains(needle), "{needle:?} in {message}");
    }
    let diff = differences(&maps, &dump_pinned(&pins));
    assert!(diff.is_empty(), "maps changed: {diff:?}");
    assert_eq!(
        datagrams(&lab, 34_000, 100),
        100,
        "the first target still works"
    );
    drop(unmount);
}

/// Unmounts a namespace's bind mount (the namespace goes with it).
struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}
