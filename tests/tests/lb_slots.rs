//! How the uplink finds host VIPs: one slot per folded address, the hash map
//! when several VIPs share a slot, and slots that follow VIPs as they come,
//! change and go.

use std::net::Ipv4Addr;

use tapmesh::{
    dataplane::lb::LbWriter,
    lb::model::{LbSpec, TargetVia},
};
use tapmesh_common::lb::vip_slot;
use tapmesh_tests::{
    bpf::Bpf,
    frames::*,
    kernel_tests_enabled,
    net::{flow, stream, target, vip},
    write_lb,
};

const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;

fn mapped(a: Ipv4Addr) -> [u8; 16] {
    a.to_ipv6_mapped().octets()
}

fn spec(vips: &[(&str, Ipv4Addr)]) -> LbSpec {
    let names: Vec<&str> = vips.iter().map(|(n, _)| *n).collect();
    let via = TargetVia::Local {
        interface: "t1".into(),
        mac: "02:00:00:00:00:01".into(),
    };
    LbSpec {
        vips: vips.iter().map(|(n, a)| vip(n, &a.to_string())).collect(),
        streams: vec![stream("s", 1)],
        flows: vec![flow("all", &names, "s", &[])],
        targets: vec![target("s", 1, via)],
    }
}

fn apply(bpf: &mut Bpf, writer: &mut LbWriter, vips: &[(&str, Ipv4Addr)]) {
    let resolve = |_: &str| Ok((7u32, [2, 0, 0, 0, 0, 0x77]));
    write_lb(bpf, writer, &spec(vips), None, &resolve);
}

fn udp_to(dst: Ipv4Addr) -> Vec<u8> {
    ethernet(
        MAC_B,
        MAC_A,
        &[],
        0x0800,
        &ipv4(V4_A, dst, UDP, &[], &udp_v4(V4_A, dst, 1000, 53, b"x")),
    )
}

#[test]
fn vips_sharing_a_slot_and_vips_that_come_and_go() {
    if !kernel_tests_enabled() {
        return;
    }
    // 20.0.0.1 and 20.1.0.0 fold to the same slot; 20.0.0.2 has its own.
    let (a, b, c) = (
        Ipv4Addr::new(20, 0, 0, 1),
        Ipv4Addr::new(20, 1, 0, 0),
        Ipv4Addr::new(20, 0, 0, 2),
    );
    assert_eq!(vip_slot(&mapped(a)), vip_slot(&mapped(b)));
    assert_ne!(vip_slot(&mapped(a)), vip_slot(&mapped(c)));
    let neighbour = Ipv4Addr::new(20, 0, 0, 3);

    let mut bpf = Bpf::load();
    let mut writer = LbWriter::default();
    let action = |bpf: &mut Bpf, dst| bpf.run("tm_xdp_uplink", &udp_to(dst), 1).action;

    apply(&mut bpf, &mut writer, &[("a", a), ("c", c)]);
    assert_eq!(action(&mut bpf, a), XDP_REDIRECT, "a VIP alone in its slot");
    assert_eq!(action(&mut bpf, c), XDP_REDIRECT);
    assert_eq!(
        action(&mut bpf, b),
        XDP_PASS,
        "same slot, another address: not a VIP"
    );
    assert_eq!(action(&mut bpf, neighbour), XDP_PASS);

    apply(&mut bpf, &mut writer, &[("a", a), ("b", b), ("c", c)]);
    assert_eq!(
        action(&mut bpf, a),
        XDP_REDIRECT,
        "a shared slot defers to the hash map"
    );
    assert_eq!(action(&mut bpf, b), XDP_REDIRECT);
    assert_eq!(action(&mut bpf, c), XDP_REDIRECT);

    apply(&mut bpf, &mut writer, &[("b", b)]);
    assert_eq!(
        action(&mut bpf, a),
        XDP_PASS,
        "a removed VIP no longer balanced"
    );
    assert_eq!(action(&mut bpf, c), XDP_PASS);
    assert_eq!(
        action(&mut bpf, b),
        XDP_REDIRECT,
        "the one left has the slot to itself"
    );

    apply(&mut bpf, &mut writer, &[]);
    for dst in [a, b, c] {
        assert_eq!(action(&mut bpf, dst), XDP_PASS, "no VIPs left");
    }
    let counters = writer.counters(&bpf.ebpf).unwrap();
    assert!(counters.vips.is_empty());
}
