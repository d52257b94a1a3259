//! Building blocks: single kernel operations, each in a program of its own
//! (`ebpf/src/probes.rs`), timed like the paths.

use super::{
    lb::{vip_frame, VIP_LOCAL},
    timing::{measure_loop, Row},
    XDP_PASS, XDP_REDIRECT,
};
use crate::bpf::Bpf;

/// Rows of single kernel operations start with this.
pub const BLOCK: &str = "Building block: ";

/// Single kernel operations, each in a program of its own (`ebpf/src/probes.rs`),
/// timed like the paths: what any packet path built from them pays here.
pub fn rows(bpf: &mut Bpf) -> Vec<Row> {
    use aya::programs::{SchedClassifier, Xdp};
    let frame = vip_frame(VIP_LOCAL, 53);
    // Program, row, the return value that says it did its operation.
    let probes: [(&str, &'static str, u32); 17] = [
        (
            "tm_probe_xdp_mixed_branches",
            "Building block: XDP, 64 branches on packet bytes, taken or not",
            XDP_PASS,
        ),
        (
            "tm_probe_xdp_parse",
            "Building block: XDP, the parser (Ethernet, IPv4, UDP)",
            XDP_PASS,
        ),
        (
            "tm_probe_xdp_size",
            "Building block: XDP, the uplink's code present but not run",
            XDP_PASS,
        ),
        (
            "tm_probe_xdp_values",
            "Building block: XDP, 8 array values read",
            XDP_PASS,
        ),
        (
            "tm_probe_xdp_counters",
            "Building block: XDP, 4 per-CPU counters",
            XDP_PASS,
        ),
        (
            "tm_probe_xdp_branches",
            "Building block: XDP, 32 conditional branches (not taken)",
            XDP_PASS,
        ),
        (
            "tm_probe_xdp_alu",
            "Building block: XDP, ~200 ALU instructions, no branch",
            XDP_PASS,
        ),
        (
            "tm_probe_xdp_array",
            "Building block: XDP, one array map lookup",
            XDP_PASS,
        ),
        (
            "tm_probe_xdp_hash_miss",
            "Building block: XDP, one hash map lookup (miss)",
            XDP_PASS,
        ),
        (
            "tm_probe_xdp_adjust_head",
            "Building block: XDP, bpf_xdp_adjust_head",
            XDP_PASS,
        ),
        (
            "tm_probe_xdp_redirect",
            "Building block: XDP, bpf_redirect",
            XDP_REDIRECT,
        ),
        (
            "tm_probe_tc_lru_hit",
            "Building block: TC, one LRU hash lookup (hit)",
            0,
        ),
        (
            "tm_probe_tc_l4_csum",
            "Building block: TC, bpf_l4_csum_replace",
            0,
        ),
        (
            "tm_probe_tc_adjust_room",
            "Building block: TC, bpf_skb_adjust_room (IPv4 + UDP encap)",
            0,
        ),
        (
            "tm_probe_tc_change_head",
            "Building block: TC, bpf_skb_change_head (28 bytes)",
            0,
        ),
        (
            "tm_probe_tc_adjust_room_plain",
            "Building block: TC, bpf_skb_adjust_room (28 bytes, no encapsulation flags)",
            0,
        ),
        (
            "tm_probe_tc_redirect",
            "Building block: TC, bpf_redirect",
            7,
        ),
    ];
    let mut rows = Vec::new();
    for (program, name, action) in probes {
        let p = bpf.ebpf.program_mut(program).expect(program);
        if let Ok(xdp) = <&mut Xdp>::try_from(&mut *p) {
            xdp.load()
        } else {
            <&mut SchedClassifier>::try_from(p)
                .expect("xdp or tc")
                .load()
        }
        .unwrap_or_else(|e| panic!("loading {program}: {e}"));
        let first = bpf.run(program, &frame, 1);
        assert_eq!(first.action, action, "{program}: unexpected return value");
        let (raw, floor) = measure_loop(bpf, program, &frame);
        rows.push((name, raw, floor));
    }
    rows
}
