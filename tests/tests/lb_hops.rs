//! Remote targets with a next hop the daemon resolved: the uplink writes the
//! cached MACs and redirects without a FIB lookup; without one it falls back
//! to the lookup (which, outside a namespace with a route, finds nothing).

use std::{collections::BTreeMap, net::Ipv4Addr};

use tapmesh::{
    dataplane::lb::{Hop, LbWriter},
    lb::model::TargetVia,
};
use tapmesh_common::{DropReason, ProgramSlot};
use tapmesh_tests::{bpf::Bpf, frames::*, kernel_tests_enabled, net::one_target_spec, write_lb};

const XDP_DROP: u32 = 1;
const XDP_REDIRECT: u32 = 4;
const NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 7, 1);
const REMOTE: Ipv4Addr = Ipv4Addr::new(198, 18, 7, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 77);

#[test]
fn a_resolved_next_hop_skips_the_fib_lookup() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut bpf = Bpf::load();
    let mut writer = LbWriter::default();
    let remote = TargetVia::Remote {
        node: REMOTE.to_string(),
    };
    let spec = one_target_spec(&VIP.to_string(), "s", 1, &[], remote);
    let no_local = |_: &str| Err("no local targets here".to_string());
    write_lb(&mut bpf, &mut writer, &spec, Some(NODE), &no_local);
    let inner = ipv4(V4_A, VIP, UDP, &[], &udp_v4(V4_A, VIP, 4000, 80, b"hop"));
    let frame = ethernet(MAC_B, MAC_A, &[], 0x0800, &inner);

    // No hop known, no route in this namespace for the node: the FIB lookup fails.
    let before = bpf.stats(ProgramSlot::XdpUplink);
    assert_eq!(bpf.run("tm_xdp_uplink", &frame, 1).action, XDP_DROP);
    let after = bpf.stats(ProgramSlot::XdpUplink);
    let fib = after.drops.get(DropReason::FibLookupFailed)
        - before.drops.get(DropReason::FibLookupFailed);
    let neigh =
        after.drops.get(DropReason::NoNeighbour) - before.drops.get(DropReason::NoNeighbour);
    assert_eq!(fib + neigh, 1, "dropped by the FIB lookup");

    // With a resolved hop: the cached MACs, redirected to its interface.
    let hop = Hop {
        ifindex: 99,
        dst_mac: [2, 0, 0, 0, 7, 2],
        src_mac: [2, 0, 0, 0, 7, 1],
        mtu: 1500,
        veth: false,
    };
    writer
        .set_hops(&mut bpf.ebpf, BTreeMap::from([(REMOTE, hop)]))
        .unwrap();
    let run = bpf.run("tm_xdp_uplink", &frame, 1);
    assert_eq!(run.action, XDP_REDIRECT);
    let out = &run.output;
    assert_eq!(out[..6], hop.dst_mac);
    assert_eq!(out[6..12], hop.src_mac);
    assert_eq!(out[12..14], [0x08, 0x00]);
    assert_eq!(out[14 + 12..14 + 16], NODE.octets(), "outer source");
    assert_eq!(out[14 + 16..14 + 20], REMOTE.octets(), "outer destination");
    assert_eq!(u16::from_be_bytes([out[36], out[37]]), 50103, "tunnel port");
    assert_eq!(&out[42..], &inner[..], "the inner packet unchanged");

    // Forgetting the hop goes back to the lookup.
    writer.set_hops(&mut bpf.ebpf, BTreeMap::new()).unwrap();
    assert_eq!(bpf.run("tm_xdp_uplink", &frame, 1).action, XDP_DROP);
}
