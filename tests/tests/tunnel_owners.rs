//! Only inner sources the sending node may use: a tunnel packet for a
//! container here whose inner source belongs to another node (an instance
//! the tables place there) or to this node is dropped, counted as
//! `tunnel_foreign_source`, and so is a source no table names inside the
//! service prefix (asked for once); the owners' node and other unknown
//! sources pass.
//! Through `tm_xdp_uplink` with BPF_PROG_TEST_RUN (IPv4 and IPv6), and on
//! two nodes in namespaces with real packets.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use aya::maps::{Array, HashMap as BpfHashMap, MapData};
use tapmesh::dataplane::{
    overlay::{OverlayTables, OverlayWriter, ServiceTable},
    tunnel::{write, TunnelSettings},
};
use tapmesh_common::{
    map_names as n,
    overlay::{
        Addr6, Instance, Instance6, Local, Local6, Miss, Miss6, OwnerSlot, OwnerSlot6,
        INSTANCE_LOCAL, INSTANCE_REMOTE, OWNER_SLOT_ONE, OWNER_SLOT_SHARED, OWNER_SLOT_STATE,
        POLICY_INSTANCE, POLICY_ROUND_ROBIN,
    },
    DropReason, ProgramSlot,
};
use tapmesh_tests::{
    bpf::Bpf,
    frames::{eth, tunnel, udp4, udp6},
    kernel_tests_enabled,
};

const NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 7, 1);
const NODE_A: Ipv4Addr = Ipv4Addr::new(198, 18, 7, 2);
const NODE_B: Ipv4Addr = Ipv4Addr::new(198, 18, 7, 3);
const PORT: u16 = 50103;
/// A container here, and its instance IP.
const HERE: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 2);
const HERE_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 200, 2);
/// An instance on node A: namespace address and instance IP.
const ON_A: Ipv4Addr = Ipv4Addr::new(198, 19, 2, 2);
const ON_A_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 200, 3);
/// An instance on node B.
const ON_B: Ipv4Addr = Ipv4Addr::new(198, 19, 3, 2);
/// Another instance on node B, whose address has the low 12 bits of
/// `HERE`: the two share a slot of `tm_ov_own_slots`.
const ON_B_SAME_SLOT: Ipv4Addr = Ipv4Addr::new(198, 19, 17, 2);
/// The containers' gateway: this node's own.
const GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 1);
/// Nobody's, as far as these tables know.
const UNKNOWN: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 99);

fn v6(last: u16) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, last)
}

/// An instance on `node`: namespace address, and the address replies come from.
fn remote(ns: Ipv4Addr, reply: Ipv4Addr, node: Ipv4Addr) -> Instance {
    Instance {
        ns_addr: ns.octets(),
        reply_addr: reply.octets(),
        node_addr: node.octets(),
        node_port: PORT,
        kind: INSTANCE_REMOTE,
        ..Default::default()
    }
}

fn tables() -> OverlayTables {
    let mut t = OverlayTables::default();
    t.instances.insert(1, remote(ON_A, ON_A_IP, NODE_A));
    t.instances.insert(2, remote(ON_B, ON_B, NODE_B));
    t.instances.insert(
        3,
        Instance {
            ns_addr: HERE.octets(),
            reply_addr: HERE_IP.octets(),
            kind: INSTANCE_LOCAL,
            ifindex: 1,
            ..Default::default()
        },
    );
    t.instances6.insert(
        1,
        Instance6 {
            ns_addr: v6(0xa).octets(),
            reply_addr: v6(0xa1).octets(),
        },
    );
    t.locals.insert(
        HERE,
        Local {
            ifindex: 1,
            instance_addr: HERE_IP.octets(),
            ..Default::default()
        },
    );
    t.locals6.insert(
        v6(0x1),
        Local6 {
            ifindex: 1,
            instance_addr: v6(0x11).octets(),
            ..Default::default()
        },
    );
    t
}

/// [`tables`] with the service prefixes: instance IPs are 198.19.200.x;
/// IPv6 2001:db8::/112 holds every [`v6`].
fn with_prefixes() -> OverlayTables {
    let mut t = tables();
    t.config.service_prefix = [198, 19, 200, 0];
    t.config.service_mask = [255, 255, 255, 0];
    t.config6.service_prefix = v6(0).octets();
    t.config6.service_mask =
        Ipv6Addr::new(0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0).octets();
    t
}

/// The object loaded, with this node's tunnel written.
fn with_tunnel() -> Bpf {
    let mut bpf = Bpf::load();
    let settings = TunnelSettings {
        port: PORT,
        address: Some(NODE),
    };
    write(&mut bpf.ebpf, settings).expect("tm_tunnel");
    bpf
}

/// Sends one tunnel packet from `node` carrying `inner`; returns whether it
/// was redirected (to the container) and whether it was counted foreign.
fn send(bpf: &mut Bpf, node: Ipv4Addr, inner: &[u8]) -> (bool, bool) {
    let reason = DropReason::TunnelForeignSource;
    let before = bpf.stats(ProgramSlot::XdpUplink).drops.get(reason);
    let run = bpf.run("tm_xdp_uplink", &tunnel(node, NODE, PORT, inner), 1);
    let after = bpf.stats(ProgramSlot::XdpUplink).drops.get(reason);
    const XDP_REDIRECT: u32 = 4;
    (run.action == XDP_REDIRECT, after - before == 1)
}

fn owners(bpf: &Bpf) -> BTreeMap<Ipv4Addr, [u8; 4]> {
    let map: BpfHashMap<&MapData, [u8; 4], [u8; 4]> =
        BpfHashMap::try_from(bpf.ebpf.map(n::OV_OWNERS).expect("owners")).unwrap();
    map.iter()
        .map(|e| e.unwrap())
        .map(|(k, v)| (k.into(), v))
        .collect()
}

fn owners6(bpf: &Bpf) -> BTreeMap<Ipv6Addr, [u8; 4]> {
    let map: BpfHashMap<&MapData, Addr6, [u8; 4]> =
        BpfHashMap::try_from(bpf.ebpf.map(n::OV_OWNERS6).expect("owners6")).unwrap();
    map.iter()
        .map(|e| e.unwrap())
        .map(|(k, v)| (k.into(), v))
        .collect()
}

/// The non-empty slots of `tm_ov_own_slots`.
fn owner_slots(bpf: &Bpf) -> BTreeMap<u32, OwnerSlot> {
    let map: Array<&MapData, OwnerSlot> =
        Array::try_from(bpf.ebpf.map(n::OV_OWNER_SLOTS).expect("owner slots")).unwrap();
    map.iter()
        .map(|e| e.unwrap())
        .enumerate()
        .filter(|(_, s)| *s != OwnerSlot::default())
        .map(|(i, s)| (i as u32, s))
        .collect()
}

/// The non-empty slots of `tm_ov_own_slot6`.
fn owner_slots6(bpf: &Bpf) -> BTreeMap<u32, OwnerSlot6> {
    let map: Array<&MapData, OwnerSlot6> =
        Array::try_from(bpf.ebpf.map(n::OV_OWNER_SLOTS6).expect("owner slots6")).unwrap();
    map.iter()
        .map(|e| e.unwrap())
        .enumerate()
        .filter(|(_, s)| *s != OwnerSlot6::default())
        .map(|(i, s)| (i as u32, s))
        .collect()
}

/// A slot holding the one owner of `addr`.
fn one(addr: Ipv4Addr, owner: [u8; 4]) -> OwnerSlot {
    OwnerSlot {
        addr: addr.octets(),
        owner,
        state: OWNER_SLOT_ONE,
    }
}

#[test]
fn inner_sources_are_checked_against_the_node_that_sent_them() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut bpf = with_tunnel();
    let mut writer = OverlayWriter::default();
    writer.apply(&mut bpf.ebpf, &tables()).expect("apply");

    // The maps, exactly: every instance's addresses under its node, this
    // node's under 0.0.0.0.
    let here = [0; 4];
    assert_eq!(
        owners(&bpf),
        BTreeMap::from([
            (HERE, here),
            (HERE_IP, here),
            (ON_A, NODE_A.octets()),
            (ON_A_IP, NODE_A.octets()),
            (ON_B, NODE_B.octets()),
        ])
    );
    // Their array copy, by the low 12 bits of the address.
    let (a, b) = (NODE_A.octets(), NODE_B.octets());
    assert_eq!(
        owner_slots(&bpf),
        BTreeMap::from([
            (0x102, one(HERE, here)),
            (0x202, one(ON_A, a)),
            (0x302, one(ON_B, b)),
            (0x802, one(HERE_IP, here)),
            (0x803, one(ON_A_IP, a)),
        ])
    );
    assert_eq!(
        owners6(&bpf),
        BTreeMap::from([
            (v6(0x1), here),
            (v6(0x11), here),
            (v6(0xa), NODE_A.octets()),
            (v6(0xa1), NODE_A.octets()),
        ])
    );

    // By the low 12 bits of the last word.
    let one6 = |addr: Ipv6Addr, owner| OwnerSlot6 {
        addr: addr.octets(),
        owner,
        state: OWNER_SLOT_ONE,
    };
    assert_eq!(
        owner_slots6(&bpf),
        BTreeMap::from([
            (0x1, one6(v6(0x1), here)),
            (0xa, one6(v6(0xa), a)),
            (0x11, one6(v6(0x11), here)),
            (0xa1, one6(v6(0xa1), a)),
        ])
    );

    let to_here = |src| udp4(src, HERE, 40000, 7000, b"x");
    assert_eq!(send(&mut bpf, NODE_A, &to_here(ON_A)), (true, false));
    assert_eq!(send(&mut bpf, NODE_A, &to_here(ON_A_IP)), (true, false));
    assert_eq!(send(&mut bpf, NODE_B, &to_here(ON_B)), (true, false));
    assert_eq!(
        send(&mut bpf, NODE_A, &to_here(UNKNOWN)),
        (true, false),
        "not judged"
    );
    assert_eq!(
        send(&mut bpf, NODE_B, &to_here(ON_A)),
        (false, true),
        "A's, from B"
    );
    assert_eq!(
        send(&mut bpf, NODE_A, &to_here(ON_B)),
        (false, true),
        "B's, from A"
    );
    assert_eq!(
        send(&mut bpf, NODE_A, &to_here(HERE_IP)),
        (false, true),
        "ours"
    );

    let to_here6 = |src| udp6(src, v6(0x1), 40000, 7000, b"x");
    assert_eq!(send(&mut bpf, NODE_A, &to_here6(v6(0xa))), (true, false));
    assert_eq!(
        send(&mut bpf, NODE_A, &to_here6(v6(0xee))),
        (true, false),
        "not judged"
    );
    assert_eq!(
        send(&mut bpf, NODE_B, &to_here6(v6(0xa1))),
        (false, true),
        "A's, from B"
    );
    assert_eq!(
        send(&mut bpf, NODE_A, &to_here6(v6(0x11))),
        (false, true),
        "ours"
    );

    // This node's own addresses (its tunnel address, the containers'
    // gateways) and martians, which the kernel drops on arrival; a class E
    // address is none of them.
    let mut t = tables();
    t.config.gateway = GATEWAY.octets();
    t.config6.gateway = v6(0xfe).octets();
    writer.apply(&mut bpf.ebpf, &t).expect("apply");
    let refused4 = [
        NODE,
        GATEWAY,
        Ipv4Addr::LOCALHOST,
        Ipv4Addr::new(0, 0, 0, 7),
        Ipv4Addr::new(224, 0, 0, 5),
        Ipv4Addr::BROADCAST,
    ];
    for src in refused4 {
        assert_eq!(
            send(&mut bpf, NODE_A, &to_here(src)),
            (false, true),
            "{src}"
        );
    }
    let class_e = Ipv4Addr::new(240, 0, 0, 9);
    assert_eq!(send(&mut bpf, NODE_A, &to_here(class_e)), (true, false));
    // Just outside fe80::/10 (site-local, deprecated, but forwarded).
    let site_local = Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 7);
    assert_eq!(send(&mut bpf, NODE_A, &to_here6(site_local)), (true, false));
    let refused6 = [
        v6(0xfe),
        Ipv6Addr::LOCALHOST,
        Ipv6Addr::UNSPECIFIED,
        Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1),
        ON_A.to_ipv6_mapped(),
        // Link-local: no router forwards it (the edges of fe80::/10).
        Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 7),
        Ipv6Addr::new(0xfebf, 0xffff, 0, 0, 0, 0, 0, 7),
    ];
    for src in refused6 {
        assert_eq!(
            send(&mut bpf, NODE_A, &to_here6(src)),
            (false, true),
            "{src}"
        );
    }
    writer.apply(&mut bpf.ebpf, &tables()).expect("apply");

    // Not for a container here: the check does not apply (the packet goes
    // on to the load balancer, which passes it: no VIP).
    let elsewhere = udp4(ON_A, UNKNOWN, 40000, 7000, b"x");
    assert_eq!(send(&mut bpf, NODE_B, &elsewhere), (false, false));

    // The instance on A gone: its addresses are nobody's, and B's packet
    // from them is no longer judged.
    let mut t = tables();
    t.instances.remove(&1);
    t.instances6.remove(&1);
    writer.apply(&mut bpf.ebpf, &t).expect("apply");
    assert!(!owners(&bpf).contains_key(&ON_A) && !owners(&bpf).contains_key(&ON_A_IP));
    assert!(!owners6(&bpf).contains_key(&v6(0xa)));
    assert_eq!(send(&mut bpf, NODE_B, &to_here(ON_A)), (true, false));

    // An address two nodes claim (tables caught mid-move) is not judged.
    let mut t = tables();
    t.instances.get_mut(&2).unwrap().ns_addr = ON_A.octets();
    writer.apply(&mut bpf.ebpf, &t).expect("apply");
    assert!(!owners(&bpf).contains_key(&ON_A));
    assert_eq!(owners(&bpf).get(&ON_A_IP), Some(&NODE_A.octets()));

    assert_eq!(owner_slots(&bpf).get(&0x202), None);

    // Two owners in one slot: the slot sends packets to `tm_ov_owners`,
    // which judges both.
    let mut t = tables();
    t.instances
        .insert(4, remote(ON_B_SAME_SLOT, ON_B_SAME_SLOT, NODE_B));
    writer.apply(&mut bpf.ebpf, &t).expect("apply");
    assert_eq!(
        owner_slots(&bpf).get(&0x102).map(|s| s.state),
        Some(OWNER_SLOT_SHARED)
    );
    assert_eq!(
        send(&mut bpf, NODE_B, &to_here(ON_B_SAME_SLOT)),
        (true, false)
    );
    assert_eq!(
        send(&mut bpf, NODE_A, &to_here(ON_B_SAME_SLOT)),
        (false, true),
        "B's, from A, through a shared slot"
    );
    assert_eq!(
        send(&mut bpf, NODE_A, &to_here(HERE)),
        (false, true),
        "ours, through a shared slot"
    );
    // The second owner gone again: the slot holds the first alone.
    writer.apply(&mut bpf.ebpf, &tables()).expect("apply");
    assert_eq!(owner_slots(&bpf).get(&0x102), Some(&one(HERE, here)));

    // Everything gone: the maps are empty.
    writer
        .apply(&mut bpf.ebpf, &OverlayTables::default())
        .expect("apply");
    assert_eq!((owners(&bpf).len(), owners6(&bpf).len()), (0, 0));
    assert_eq!(owner_slots(&bpf), BTreeMap::new());
    assert_eq!(owner_slots6(&bpf), BTreeMap::new());
}

/// The misses waiting in `tm_ov_misses`: (address asked for, the packet's
/// other address), IPv4 and IPv6 told apart by length.
fn misses(bpf: &mut Bpf) -> Vec<(IpAddr, IpAddr)> {
    let mut ring = aya::maps::RingBuf::try_from(bpf.ebpf.map_mut(n::OV_MISSES).expect("misses"))
        .expect("a ring buffer");
    let mut found = Vec::new();
    while let Some(item) = ring.next() {
        if item.len() >= std::mem::size_of::<Miss6>() {
            // SAFETY: the kernel wrote a `Miss6` (size checked); read unaligned.
            let m: Miss6 = unsafe { std::ptr::read_unaligned(item.as_ptr() as *const Miss6) };
            found.push((
                Ipv6Addr::from(m.service_addr).into(),
                Ipv6Addr::from(m.client_addr).into(),
            ));
        } else {
            // SAFETY: as above, for a `Miss`.
            let m: Miss = unsafe { std::ptr::read_unaligned(item.as_ptr() as *const Miss) };
            found.push((
                Ipv4Addr::from(m.service_addr).into(),
                Ipv4Addr::from(m.client_addr).into(),
            ));
        }
    }
    found
}

/// A source no table names, inside the service prefix (an instance IP this
/// node has not learnt): refused and counted like a foreign one, and asked
/// for once through the miss ring; once the table places it on the node
/// that sent it, it passes. Outside the prefix it is not judged.
#[test]
fn unknown_sources_in_the_service_prefix_wait_for_a_table_that_names_their_node() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut bpf = with_tunnel();
    let mut t = with_prefixes();
    let mut writer = OverlayWriter::default();
    writer.apply(&mut bpf.ebpf, &t).expect("apply");
    assert_eq!(misses(&mut bpf), []);

    let new_ip = Ipv4Addr::new(198, 19, 200, 77);
    let to_here = |src| udp4(src, HERE, 40000, 7000, b"x");
    for _ in 0..3 {
        assert_eq!(send(&mut bpf, NODE_A, &to_here(new_ip)), (false, true));
    }
    // Asked for once, however many packets came.
    assert_eq!(misses(&mut bpf), [(new_ip.into(), HERE.into())]);
    assert_eq!(
        send(&mut bpf, NODE_A, &to_here(UNKNOWN)),
        (true, false),
        "outside the prefix: not judged"
    );
    assert_eq!(send(&mut bpf, NODE_A, &to_here(ON_A_IP)), (true, false));
    // Not for a container here (the load balancer's traffic): not judged, not asked for.
    let elsewhere = udp4(new_ip, UNKNOWN, 40000, 7000, b"x");
    assert_eq!(send(&mut bpf, NODE_A, &elsewhere), (false, false));

    let new_ip6 = v6(0x77);
    let to_here6 = |src| udp6(src, v6(0x1), 40000, 7000, b"x");
    assert_eq!(send(&mut bpf, NODE_A, &to_here6(new_ip6)), (false, true));
    assert_eq!(send(&mut bpf, NODE_A, &to_here6(new_ip6)), (false, true));
    let elsewhere6 = udp6(v6(0x78), v6(0x99), 40000, 7000, b"x");
    assert_eq!(send(&mut bpf, NODE_A, &elsewhere6), (false, false));
    assert_eq!(misses(&mut bpf), [(new_ip6.into(), v6(0x1).into())]);
    assert_eq!(
        send(&mut bpf, NODE_A, &to_here6(v6(0xa))),
        (true, false),
        "a known one"
    );

    // The table places the instance on node A: A's packets pass, B's do not.
    t.instances
        .insert(5, remote(Ipv4Addr::new(198, 19, 2, 77), new_ip, NODE_A));
    t.instances6.insert(
        5,
        Instance6 {
            ns_addr: v6(0x7a).octets(),
            reply_addr: new_ip6.octets(),
        },
    );
    writer.apply(&mut bpf.ebpf, &t).expect("apply");
    // As if the daemon's retry timer had run: the addresses may be asked for again.
    clear_pending(&mut bpf, new_ip.into());
    clear_pending(&mut bpf, new_ip6.into());
    assert_eq!(send(&mut bpf, NODE_A, &to_here(new_ip)), (true, false));
    assert_eq!(send(&mut bpf, NODE_B, &to_here(new_ip)), (false, true));
    assert_eq!(send(&mut bpf, NODE_A, &to_here6(new_ip6)), (true, false));
    assert_eq!(send(&mut bpf, NODE_B, &to_here6(new_ip6)), (false, true));
    assert_eq!(misses(&mut bpf), [], "known now: nothing more asked");

    // Service IPs the tables hold as sources. An instance IP two nodes claim
    // (mid-move) is in no owner map: not judged, not asked for. An RR
    // address, which no node sends from: refused, not asked for.
    let (contested, rr) = (
        Ipv4Addr::new(198, 19, 200, 90),
        Ipv4Addr::new(198, 19, 200, 91),
    );
    for (id, node) in [(6, NODE_A), (7, NODE_B)] {
        t.instances.insert(
            id,
            remote(Ipv4Addr::new(198, 19, 2, id as u8), contested, node),
        );
    }
    let service = |id, policy| ServiceTable {
        id,
        policy,
        slots: vec![6],
    };
    t.services.insert(contested, service(1, POLICY_INSTANCE));
    t.services.insert(rr, service(2, POLICY_ROUND_ROBIN));
    writer.apply(&mut bpf.ebpf, &t).expect("apply");
    assert!(!owners(&bpf).contains_key(&contested));
    assert_eq!(send(&mut bpf, NODE_A, &to_here(contested)), (true, false));
    assert_eq!(send(&mut bpf, NODE_B, &to_here(contested)), (true, false));
    assert_eq!(send(&mut bpf, NODE_A, &to_here(rr)), (false, true));
    assert_eq!(misses(&mut bpf), [], "tables hold them: nothing asked");
}

/// An IPv6 packet through the tunnel is forwarded as a router would: it
/// reaches the container with one hop less, and one with a hop limit of 1
/// (or 0) is dropped as `ttl_exceeded`. So neighbour discovery from a
/// node (hop limit 255 on the link only) never arrives as on the link.
#[test]
fn ipv6_through_the_tunnel_loses_one_hop_and_none_left_is_dropped() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut bpf = with_tunnel();
    let mut writer = OverlayWriter::default();
    writer.apply(&mut bpf.ebpf, &tables()).expect("apply");
    let with_hops = |hops: u8| {
        let mut p = udp6(v6(0xa), v6(0x1), 40000, 7000, b"x");
        p[7] = hops;
        p
    };
    const XDP_REDIRECT: u32 = 4;
    for (sent, arrived) in [(255u8, 254u8), (64, 63), (2, 1)] {
        let run = bpf.run(
            "tm_xdp_uplink",
            &tunnel(NODE_A, NODE, PORT, &with_hops(sent)),
            1,
        );
        assert_eq!(run.action, XDP_REDIRECT, "hop limit {sent}");
        // Ethernet, then the IPv6 header: its hop limit is byte 7.
        assert_eq!(run.output[14 + 7], arrived, "hop limit {sent}");
        // And nothing else of it changed.
        let want = with_hops(arrived);
        assert_eq!(&run.output[14..14 + want.len()], &want[..]);
    }
    for sent in [1u8, 0] {
        dropped_once(&mut bpf, &with_hops(sent), DropReason::TtlExceeded);
    }
}

/// Tunnels `inner` from node A: dropped, and counted once as `reason`.
fn dropped_once(bpf: &mut Bpf, inner: &[u8], reason: DropReason) {
    let before = bpf.stats(ProgramSlot::XdpUplink).drops.get(reason);
    let run = bpf.run("tm_xdp_uplink", &tunnel(NODE_A, NODE, PORT, inner), 1);
    assert_eq!(run.action, 1, "dropped: {inner:02x?}");
    let after = bpf.stats(ProgramSlot::XdpUplink).drops.get(reason);
    assert_eq!(
        after - before,
        1,
        "counted once as {reason:?}: {inner:02x?}"
    );
}

/// IPv4 as IPv6: one TTL less on the way through the tunnel, with the
/// header checksum the kernel's `ip_decrease_ttl` gives (computed here
/// anew), and a TTL of 1 or 0 is the end of it.
#[test]
fn ipv4_through_the_tunnel_loses_one_ttl_and_none_left_is_dropped() {
    use tapmesh_tests::frames::internet_checksum;
    if !kernel_tests_enabled() {
        return;
    }
    let mut bpf = with_tunnel();
    let mut writer = OverlayWriter::default();
    writer.apply(&mut bpf.ebpf, &tables()).expect("apply");
    let with_ttl = |ttl: u8| {
        let mut p = udp4(ON_A, HERE, 40000, 7000, b"x");
        p[8] = ttl;
        p[10..12].fill(0);
        let sum = internet_checksum(&[&p[..20]]);
        p[10..12].copy_from_slice(&sum.to_be_bytes());
        p
    };
    const XDP_REDIRECT: u32 = 4;
    for (sent, arrived) in [(255u8, 254u8), (64, 63), (2, 1)] {
        let run = bpf.run(
            "tm_xdp_uplink",
            &tunnel(NODE_A, NODE, PORT, &with_ttl(sent)),
            1,
        );
        assert_eq!(run.action, XDP_REDIRECT, "ttl {sent}");
        // Ethernet, then the IPv4 header: its TTL is byte 8, and the rest
        // is as a sender with that TTL would have made it.
        let want = with_ttl(arrived);
        assert_eq!(&run.output[14..14 + want.len()], &want[..], "ttl {sent}");
    }
    // Every checksum the header can carry, through the carries of the
    // incremental update (the identification field moves it): the result
    // is the checksum computed anew, every time.
    for id in 0..=u16::MAX {
        let mut sent = with_ttl(64);
        sent[4..6].copy_from_slice(&id.to_be_bytes());
        sent[10..12].fill(0);
        let sum = internet_checksum(&[&sent[..20]]);
        sent[10..12].copy_from_slice(&sum.to_be_bytes());
        let run = bpf.run("tm_xdp_uplink", &tunnel(NODE_A, NODE, PORT, &sent), 1);
        let mut want = sent.clone();
        want[8] = 63;
        want[10..12].fill(0);
        let sum = internet_checksum(&[&want[..20]]);
        want[10..12].copy_from_slice(&sum.to_be_bytes());
        assert_eq!(&run.output[14..14 + want.len()], &want[..], "id {id}");
    }
    for sent in [1u8, 0] {
        dropped_once(&mut bpf, &with_ttl(sent), DropReason::TtlExceeded);
    }
}

/// A node no table or setting names yet (its packets dropped as
/// `tunnel_unknown_node`) makes this node ask about the inner source of a
/// packet for a container here, an instance IP in the service prefix no
/// table holds, whether or not the inner IPv4 header carries options.
#[test]
fn a_strangers_first_packet_is_asked_about_with_or_without_ip_options() {
    use tapmesh_common::overlay::MISS_FROM_STRANGER;
    use tapmesh_tests::frames::{ipv4, udp_v4, UDP};
    if !kernel_tests_enabled() {
        return;
    }
    let mut bpf = with_tunnel();
    let mut writer = OverlayWriter::default();
    writer
        .apply(&mut bpf.ebpf, &with_prefixes())
        .expect("apply");
    let stranger = Ipv4Addr::new(198, 18, 7, 9);
    let asked = |bpf: &mut Bpf, src: Ipv4Addr, options: &[u8]| {
        let inner = ipv4(
            src,
            HERE,
            UDP,
            options,
            &udp_v4(src, HERE, 40000, 7000, b"x"),
        );
        let unknown = DropReason::TunnelUnknownNode;
        let before = bpf.stats(ProgramSlot::XdpUplink).drops.get(unknown);
        let run = bpf.run("tm_xdp_uplink", &tunnel(stranger, NODE, PORT, &inner), 1);
        assert_eq!(run.action, 1, "a stranger's packet is dropped");
        let after = bpf.stats(ProgramSlot::XdpUplink).drops.get(unknown);
        assert_eq!(after - before, 1, "counted as from an unknown node");
        let mut ring =
            aya::maps::RingBuf::try_from(bpf.ebpf.map_mut(n::OV_MISSES).expect("misses"))
                .expect("a ring buffer");
        let mut found = Vec::new();
        while let Some(item) = ring.next() {
            // SAFETY: the kernel wrote a `Miss` (IPv4); read unaligned.
            let m: Miss = unsafe { std::ptr::read_unaligned(item.as_ptr() as *const Miss) };
            found.push((
                Ipv4Addr::from(m.service_addr),
                Ipv4Addr::from(m.client_addr),
                m.flags,
            ));
        }
        found
    };
    let plain = Ipv4Addr::new(198, 19, 200, 81);
    assert_eq!(
        asked(&mut bpf, plain, &[]),
        [(plain, HERE, MISS_FROM_STRANGER)]
    );
    // Four no-operation options: a 24-byte header.
    let with_options = Ipv4Addr::new(198, 19, 200, 82);
    assert_eq!(
        asked(&mut bpf, with_options, &[1, 1, 1, 1]),
        [(with_options, HERE, MISS_FROM_STRANGER)]
    );
    // Repeats of an address asked about already (more than the 32 asks a
    // second strangers get) are not asked again and leave the budget to a
    // new address.
    for _ in 0..40 {
        assert_eq!(asked(&mut bpf, plain, &[]), []);
    }
    let new = Ipv4Addr::new(198, 19, 200, 83);
    assert_eq!(asked(&mut bpf, new, &[]), [(new, HERE, MISS_FROM_STRANGER)]);
    // A pending entry no daemon cleared (stamped at boot, long ago) does
    // not keep its address from being asked about again.
    let left = Ipv4Addr::new(198, 19, 200, 84);
    {
        let mut map: BpfHashMap<&mut MapData, [u8; 4], u64> =
            BpfHashMap::try_from(bpf.ebpf.map_mut(n::OV_PENDING).expect("pending")).unwrap();
        map.insert(left.octets(), 0, 0).expect("a pending entry");
    }
    assert_eq!(
        asked(&mut bpf, left, &[]),
        [(left, HERE, MISS_FROM_STRANGER)]
    );

    // An inner IPv6 packet the same way: its source asked about once, as a
    // stranger's; a repeat is not asked again, nor one for no container
    // here.
    let asked6 = |bpf: &mut Bpf, src: Ipv6Addr, dst: Ipv6Addr| {
        let inner = udp6(src, dst, 40000, 7000, b"x");
        let run = bpf.run("tm_xdp_uplink", &tunnel(stranger, NODE, PORT, &inner), 1);
        assert_eq!(run.action, 1, "a stranger's packet is dropped");
        let mut ring =
            aya::maps::RingBuf::try_from(bpf.ebpf.map_mut(n::OV_MISSES).expect("misses"))
                .expect("a ring buffer");
        let mut found = Vec::new();
        while let Some(item) = ring.next() {
            assert_eq!(item.len(), std::mem::size_of::<Miss6>(), "an IPv6 report");
            // SAFETY: the kernel wrote a `Miss6` (size checked); read unaligned.
            let m: Miss6 = unsafe { std::ptr::read_unaligned(item.as_ptr() as *const Miss6) };
            found.push((
                Ipv6Addr::from(m.service_addr),
                Ipv6Addr::from(m.client_addr),
                m.protocol,
                m.flags,
            ));
        }
        found
    };
    let (src6, here6) = (v6(0x81), v6(0x1));
    assert_eq!(
        asked6(&mut bpf, src6, here6),
        [(src6, here6, 17, MISS_FROM_STRANGER)]
    );
    assert_eq!(asked6(&mut bpf, src6, here6), []);
    assert_eq!(asked6(&mut bpf, v6(0x82), v6(0x2)), []);
}

/// Outside the tunnel (routed to the node as plain IP), a packet for a
/// container here may not carry a source of the service prefix: only the
/// tunnel carries instance and service IPs between nodes, so such a source
/// is forged (else anyone who can route to the node could pose as another
/// node's instance and have the container's replies tunnelled there).
#[test]
fn outside_the_tunnel_a_service_prefix_source_reaches_no_container() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut bpf = with_tunnel();
    let t = with_prefixes();
    OverlayWriter::default()
        .apply(&mut bpf.ebpf, &t)
        .expect("apply");
    const XDP_DROP: u32 = 1;
    const XDP_PASS: u32 = 2;
    let reason = DropReason::ServiceSourceOutsideTunnel;
    // (action, counted as this reason) of one plain frame.
    let mut plain = |frame: Vec<u8>| {
        let before = bpf.stats(ProgramSlot::XdpUplink).drops.get(reason);
        let run = bpf.run("tm_xdp_uplink", &frame, 1);
        let after = bpf.stats(ProgramSlot::XdpUplink).drops.get(reason);
        (run.action, after - before)
    };
    let to_here = |src| eth(&udp4(src, HERE, 40000, 7000, b"x"));
    // Another node's instance IP, this node's own, an unknown one of the prefix.
    for src in [ON_A_IP, HERE_IP, Ipv4Addr::new(198, 19, 200, 77)] {
        assert_eq!(plain(to_here(src)), (XDP_DROP, 1), "from {src}");
    }
    // Sources outside the prefix (a namespace address, a client's) and
    // packets for no container here are the kernel's to route.
    assert_eq!(plain(to_here(ON_A)), (XDP_PASS, 0));
    assert_eq!(plain(to_here(UNKNOWN)), (XDP_PASS, 0));
    let elsewhere = eth(&udp4(ON_A_IP, UNKNOWN, 40000, 7000, b"x"));
    assert_eq!(plain(elsewhere), (XDP_PASS, 0));

    let to_here6 = |src| eth(&udp6(src, v6(0x1), 40000, 7000, b"x"));
    assert_eq!(plain(to_here6(v6(0xa1))), (XDP_DROP, 1));
    let outside = Ipv6Addr::new(0x2001, 0xdb8, 9, 0, 0, 0, 0, 1);
    assert_eq!(plain(to_here6(outside)), (XDP_PASS, 0));
    assert_eq!(
        plain(eth(&udp6(v6(0xa1), v6(0x99), 40000, 7000, b"x"))),
        (XDP_PASS, 0)
    );

    // The same source through the tunnel from its owner's node is delivered.
    assert_eq!(
        send(&mut bpf, NODE_A, &udp4(ON_A_IP, HERE, 40000, 7000, b"x")),
        (true, false)
    );
}

/// The inner packet must fill the UDP datagram exactly: a tunnel packet whose
/// outer lengths say it carries less (the rest of the inner packet after the
/// outer IP packet, or an empty datagram) or more (bytes after the inner
/// packet, IPv4 or IPv6) is dropped as `bad_tunnel_packet`, in its usual
/// shape and tagged (the parser's path).
#[test]
fn an_inner_packet_that_does_not_fill_its_datagram_exactly_is_dropped() {
    use tapmesh_tests::frames::{eth_tagged, ip_packet, set_ipv4_total_length};
    if !kernel_tests_enabled() {
        return;
    }
    let mut bpf = with_tunnel();
    OverlayWriter::default()
        .apply(&mut bpf.ebpf, &tables())
        .expect("apply");
    let reason = DropReason::BadTunnelPacket;
    let mut run = |frame: &[u8]| {
        let before = bpf.stats(ProgramSlot::XdpUplink).drops.get(reason);
        let run = bpf.run("tm_xdp_uplink", frame, 1);
        let after = bpf.stats(ProgramSlot::XdpUplink).drops.get(reason);
        (run.action, after - before)
    };
    const XDP_DROP: u32 = 1;
    const XDP_REDIRECT: u32 = 4;
    let inner = udp4(ON_A_IP, HERE, 40000, 7000, b"payload");
    let whole = tunnel(NODE_A, NODE, PORT, &inner);
    // (outer IP total length, UDP length) that carry `payload` bytes of the inner packet.
    let cut = |frame: &[u8], l3: usize, payload: usize| {
        let mut f = frame.to_vec();
        set_ipv4_total_length(&mut f, l3, (28 + payload) as u16);
        f[l3 + 24..l3 + 26].copy_from_slice(&((8 + payload) as u16).to_be_bytes());
        f
    };
    let tagged = eth_tagged(&[100], ip_packet(&whole));
    // Bytes after the inner packet, inside the datagram (as in packets
    // merged by GRO before generic XDP): the outer lengths count them.
    let longer = tunnel(NODE_A, NODE, PORT, &[inner.as_slice(), b"xx"].concat());
    let longer_tagged = eth_tagged(&[100], ip_packet(&longer));
    let inner6 = udp6(v6(0xa1), v6(0x1), 40000, 7000, b"payload");
    let longer6 = tunnel(NODE_A, NODE, PORT, &[inner6.as_slice(), b"xx"].concat());
    for (name, frame) in [
        ("plain", &longer),
        ("tagged", &longer_tagged),
        ("IPv6", &longer6),
    ] {
        assert_eq!(
            run(frame),
            (XDP_DROP, 1),
            "{name}: 2 bytes after the inner packet"
        );
    }
    for (name, frame, l3) in [("plain", &whole, 14), ("tagged", &tagged, 18)] {
        assert_eq!(
            run(frame),
            (XDP_REDIRECT, 0),
            "{name}: the whole inner packet"
        );
        for payload in [0, 1, inner.len() - 1] {
            assert_eq!(
                run(&cut(frame, l3, payload)),
                (XDP_DROP, 1),
                "{name}: {payload} of {} inner bytes in the datagram",
                inner.len()
            );
        }
    }
}

/// Forgets that `addr` was asked for (`tm_ov_pending`, `tm_ov_pending6`).
fn clear_pending(bpf: &mut Bpf, addr: IpAddr) {
    match addr {
        IpAddr::V4(a) => {
            let mut map: BpfHashMap<&mut MapData, [u8; 4], u64> =
                BpfHashMap::try_from(bpf.ebpf.map_mut(n::OV_PENDING).expect("pending")).unwrap();
            map.remove(&a.octets()).expect("asked for");
        }
        IpAddr::V6(a) => {
            let mut map: BpfHashMap<&mut MapData, Addr6, u64> =
                BpfHashMap::try_from(bpf.ebpf.map_mut(n::OV_PENDING6).expect("pending6")).unwrap();
            map.remove(&a.octets()).expect("asked for");
        }
    }
}

/// A packet let in from its owner marks the address's slot seen; the
/// daemon's read reports and clears the mark. A refused packet marks
/// nothing, and neither does an address of a shared slot.
#[test]
fn arrivals_from_an_owner_are_marked_for_the_daemon() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut bpf = with_tunnel();
    let mut writer = OverlayWriter::default();
    writer.apply(&mut bpf.ebpf, &tables()).expect("apply");
    let asked: BTreeSet<IpAddr> =
        [ON_A.into(), ON_A_IP.into(), ON_B.into(), v6(0xa1).into()].into();
    assert_eq!(
        writer.take_seen(&mut bpf.ebpf, &asked).unwrap(),
        BTreeSet::new()
    );

    let to_here = |src| udp4(src, HERE, 40000, 7000, b"x");
    let to_here6 = |src| udp6(src, v6(0x1), 40000, 7000, b"x");
    assert_eq!(send(&mut bpf, NODE_B, &to_here(ON_A_IP)), (false, true));
    assert_eq!(send(&mut bpf, NODE_B, &to_here6(v6(0xa1))), (false, true));
    assert_eq!(
        writer.take_seen(&mut bpf.ebpf, &asked).unwrap(),
        BTreeSet::new(),
        "refused"
    );
    // Not for a container here: no mark (IPv6; IPv4 checks no owner then).
    assert_eq!(
        send(
            &mut bpf,
            NODE_A,
            &udp6(v6(0xa1), v6(0x99), 40000, 7000, b"x")
        ),
        (false, false)
    );
    assert_eq!(
        writer.take_seen(&mut bpf.ebpf, &asked).unwrap(),
        BTreeSet::new(),
        "elsewhere"
    );
    for _ in 0..3 {
        assert_eq!(send(&mut bpf, NODE_A, &to_here(ON_A_IP)), (true, false));
        assert_eq!(send(&mut bpf, NODE_A, &to_here6(v6(0xa1))), (true, false));
    }
    let marked = owner_slots(&bpf)[&0x803].state;
    assert!(marked & !OWNER_SLOT_STATE != 0 && marked & OWNER_SLOT_STATE == OWNER_SLOT_ONE);
    // Marked slots still judge: the mark is above the state byte.
    assert_eq!(send(&mut bpf, NODE_B, &to_here(ON_A_IP)), (false, true));
    assert_eq!(send(&mut bpf, NODE_B, &to_here6(v6(0xa1))), (false, true));

    // A writer that adopts the maps (a restarted daemon) records the slots
    // without the marks: it leaves them in place and reads them.
    let mut adopting = OverlayWriter::default();
    adopting.apply(&mut bpf.ebpf, &tables()).expect("apply");
    assert_eq!(owner_slots(&bpf)[&0x803].state, marked);
    assert_eq!(
        adopting.take_seen(&mut bpf.ebpf, &asked).unwrap(),
        [ON_A_IP.into(), v6(0xa1).into()].into()
    );
    // Cleared: the slot is as the writer wrote it.
    assert_eq!(owner_slots(&bpf)[&0x803], one(ON_A_IP, NODE_A.octets()));
    assert_eq!(
        adopting.take_seen(&mut bpf.ebpf, &asked).unwrap(),
        BTreeSet::new()
    );

    // A shared slot (B's second instance maps where HERE does): its mark
    // counts for the address asked about.
    let mut t = tables();
    t.instances
        .insert(4, remote(ON_B_SAME_SLOT, ON_B_SAME_SLOT, NODE_B));
    adopting.apply(&mut bpf.ebpf, &t).expect("apply");
    let same_slot: BTreeSet<IpAddr> = [ON_B_SAME_SLOT.into()].into();
    assert_eq!(
        send(&mut bpf, NODE_B, &to_here(ON_B_SAME_SLOT)),
        (true, false)
    );
    assert_ne!(owner_slots(&bpf)[&0x102].state, OWNER_SLOT_SHARED, "marked");
    assert_eq!(
        adopting.take_seen(&mut bpf.ebpf, &same_slot).unwrap(),
        same_slot
    );
    assert_eq!(owner_slots(&bpf)[&0x102].state, OWNER_SLOT_SHARED);
}

/// Counts, per inner source, the datagrams a container gets on `port`
/// until 1 s passes without one.
fn receive(netns: &str, port: u16) -> std::thread::JoinHandle<BTreeMap<Ipv4Addr, u32>> {
    let netns = netns.to_string();
    let (bound, ready) = std::sync::mpsc::channel();
    let receiver = std::thread::spawn(move || {
        tapmesh::net::netns::enter(&netns).expect("entering the namespace");
        let socket = std::net::UdpSocket::bind(("0.0.0.0", port)).expect("bind");
        let _ = bound.send(());
        socket
            .set_read_timeout(Some(std::time::Duration::from_secs(1)))
            .unwrap();
        let mut buf = [0u8; 256];
        let mut got = BTreeMap::new();
        while let Ok((_, from)) = socket.recv_from(&mut buf) {
            if let std::net::IpAddr::V4(v4) = from.ip() {
                *got.entry(v4).or_insert(0) += 1;
            }
        }
        got
    });
    // Bound before anything is sent.
    ready.recv().expect("the receiver bound its socket");
    receiver
}

/// Node 1 (a real node, known to node 2) sends tunnel packets to a
/// container on node 2: with its own client's instance IP inside, all
/// arrive; with node 2's own instance IP inside (a forged reply), none do,
/// each counted once.
#[test]
fn a_node_cannot_send_another_nodes_addresses_through_the_tunnel() {
    use tapmesh_tests::{
        daemon::named,
        overlay::{TwoNodes, NODE1, NODE2},
        Netns,
    };
    if !kernel_tests_enabled() {
        return;
    }
    const WEB: &str = "app.ns.web.ns";
    const CLIENT: &str = "app.ns.client.ns";
    const CLIENT_IP: &str = "203.0.113.100";
    const WEB1_IP: &str = "203.0.113.102";
    const LATER: &str = "app.ns.later.ns";
    const LATER_IP: &str = "203.0.113.150";
    const COUNT: u32 = 1000;
    const WEB_PORT: u16 = 7999;
    let nodes = TwoNodes::start();
    nodes.node1.register("192.0.2.0/26");
    nodes.node2.register("192.0.2.64/26");
    let client = Netns::new("owc");
    let web1 = Netns::new("oww");
    let client_ns = nodes
        .node1
        .deploy(&client, CLIENT, 0, &[("InstanceNumber", CLIENT_IP)]);
    let web1_ns = nodes
        .node2
        .deploy(&web1, WEB, 1, &[("InstanceNumber", WEB1_IP)]);
    nodes.node2.table(
        CLIENT,
        &[(0, &client_ns, NODE1, &[("InstanceNumber", CLIENT_IP)])],
    );
    let web1_addr: Ipv4Addr = web1_ns.parse().unwrap();
    let send = |inner_src: &'static str| {
        let node1 = nodes.node1.netns.name.clone();
        std::thread::spawn(move || {
            tapmesh::net::netns::enter(&node1).expect("entering node 1");
            let socket = std::net::UdpSocket::bind((NODE1, 0)).expect("bind");
            let port = tapmesh_common::DEFAULT_TUNNEL_PORT;
            for i in 0..COUNT {
                let src = inner_src.parse().unwrap();
                let inner = udp4(src, web1_addr, 40000 + i as u16, WEB_PORT, b"x");
                socket.send_to(&inner, (NODE2, port)).expect("sending");
                std::thread::sleep(std::time::Duration::from_micros(300));
            }
        })
        .join()
        .unwrap();
    };
    let status = || nodes.node2.daemon.as_ref().expect("node 2").status();
    let foreign = |s| named(&s, "xdp_uplink", "tunnel_foreign_source");

    let got = receive(&web1.name, WEB_PORT);
    send(WEB1_IP);
    assert_eq!(
        got.join().unwrap(),
        BTreeMap::new(),
        "forged packets arrived"
    );
    assert_eq!(
        foreign(status()),
        u64::from(COUNT),
        "each forged one counted"
    );

    let got = receive(&web1.name, WEB_PORT);
    send(CLIENT_IP);
    assert_eq!(
        got.join().unwrap(),
        BTreeMap::from([(CLIENT_IP.parse().unwrap(), COUNT)]),
        "node 1's own client's packets"
    );
    assert_eq!(foreign(status()), u64::from(COUNT), "none of them counted");

    // An instance IP node 2 has not learnt: refused (and asked for) until
    // the cluster's table places it on node 1.
    let got = receive(&web1.name, WEB_PORT);
    send(LATER_IP);
    assert_eq!(
        got.join().unwrap(),
        BTreeMap::new(),
        "unknown source arrived"
    );
    assert_eq!(
        foreign(status()),
        u64::from(2 * COUNT),
        "each unknown one counted"
    );
    // Asked for (again only after a second: the sending may outlast one).
    std::thread::sleep(std::time::Duration::from_millis(300));
    let asked = |s: &serde_json::Value| {
        s["misses"].as_u64() >= Some(1) && s["unresolved"] == serde_json::json!([LATER_IP])
    };
    let mut last = nodes.node2.status();
    let ok = tapmesh_tests::net::wait_until(std::time::Duration::from_secs(30), || {
        last = nodes.node2.status();
        asked(&last)
    });
    assert!(ok, "{last}");
    let later = Netns::new("owl");
    let later_ns = nodes
        .node1
        .deploy(&later, LATER, 0, &[("InstanceNumber", LATER_IP)]);
    nodes.node2.table(
        LATER,
        &[(0, &later_ns, NODE1, &[("InstanceNumber", LATER_IP)])],
    );
    let got = receive(&web1.name, WEB_PORT);
    send(LATER_IP);
    assert_eq!(
        got.join().unwrap(),
        BTreeMap::from([(LATER_IP.parse().unwrap(), COUNT)]),
        "known now"
    );
    assert_eq!(foreign(status()), u64::from(2 * COUNT));
}

/// Whether `node`'s pinned `tm_ov_owners` holds `addr` as this node's.
fn owned_here(node: &tapmesh_tests::overlay::Node, addr: Ipv4Addr) -> bool {
    let root = &node.daemon.as_ref().expect("a running daemon").bpffs_root;
    let path = root.join(format!(
        "v{}/{}",
        tapmesh_common::SCHEMA_VERSION,
        n::OV_OWNERS
    ));
    let map = MapData::from_pin(&path).expect("the pinned owners map");
    let owners: BpfHashMap<MapData, [u8; 4], [u8; 4]> =
        BpfHashMap::try_from(aya::maps::Map::HashMap(map)).expect("a hash map");
    owners.get(&addr.octets(), 0).ok() == Some(tapmesh_common::overlay::OWNER_THIS_NODE)
}

/// A known node tunnels packets to a container on node 2 with an address
/// of node 2's uplink, or its subnet's broadcast address, as their inner
/// source, which the kernel would drop as a martian: none arrive while
/// node 2 has the address (added after the daemon started), each counted
/// once; once the address is gone, the same packets are an outside
/// client's and arrive.
#[test]
fn a_node_cannot_send_this_nodes_other_addresses_through_the_tunnel() {
    use tapmesh_tests::{
        daemon::named,
        overlay::{TwoNodes, NODE1, NODE2},
        Netns,
    };
    if !kernel_tests_enabled() {
        return;
    }
    const WEB: &str = "app.ns.web.ns";
    const CLIENT: &str = "app.ns.client.ns";
    const CLIENT_IP: &str = "203.0.113.100";
    const WEB1_IP: &str = "203.0.113.102";
    const COUNT: u32 = 500;
    const WEB_PORT: u16 = 7998;
    let second: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 77);
    let broadcast: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 255);
    let nodes = TwoNodes::start();
    nodes.node1.register("192.0.2.0/26");
    nodes.node2.register("192.0.2.64/26");
    let client = Netns::new("owoc");
    let web1 = Netns::new("owow");
    let client_ns = nodes
        .node1
        .deploy(&client, CLIENT, 0, &[("InstanceNumber", CLIENT_IP)]);
    let web1_ns = nodes
        .node2
        .deploy(&web1, WEB, 1, &[("InstanceNumber", WEB1_IP)]);
    nodes.node2.table(
        CLIENT,
        &[(0, &client_ns, NODE1, &[("InstanceNumber", CLIENT_IP)])],
    );
    let web1_addr: Ipv4Addr = web1_ns.parse().unwrap();
    let send = || {
        let node1 = nodes.node1.netns.name.clone();
        std::thread::spawn(move || {
            tapmesh::net::netns::enter(&node1).expect("entering node 1");
            let socket = std::net::UdpSocket::bind((NODE1, 0)).expect("bind");
            let port = tapmesh_common::DEFAULT_TUNNEL_PORT;
            for i in 0..2 * COUNT {
                let src = if i % 2 == 0 { second } else { broadcast };
                let inner = udp4(src, web1_addr, 40000 + i as u16, WEB_PORT, b"x");
                socket.send_to(&inner, (NODE2, port)).expect("sending");
                std::thread::sleep(std::time::Duration::from_micros(300));
            }
        })
        .join()
        .unwrap();
    };
    let wait_until = |want: bool, what: &str| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while [second, broadcast].map(|a| owned_here(&nodes.node2, a)) != [want; 2] {
            assert!(std::time::Instant::now() < deadline, "{what}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    let status = || nodes.node2.daemon.as_ref().expect("node 2").status();
    let foreign = |s| named(&s, "xdp_uplink", "tunnel_foreign_source");
    let cidr = format!("{second}/24");
    let uplink = &nodes.node2.uplink;

    nodes.node2.netns.ip(&["addr", "add", &cidr, "dev", uplink]);
    wait_until(
        true,
        "node 2's new address never became its own in tm_ov_owners",
    );
    let got = receive(&web1.name, WEB_PORT);
    send();
    assert_eq!(
        got.join().unwrap(),
        BTreeMap::new(),
        "node 2's own address arrived"
    );
    assert_eq!(foreign(status()), u64::from(2 * COUNT), "each one counted");

    nodes.node2.netns.ip(&["addr", "del", &cidr, "dev", uplink]);
    wait_until(false, "the removed address stayed in tm_ov_owners");
    let got = receive(&web1.name, WEB_PORT);
    send();
    assert_eq!(
        got.join().unwrap(),
        BTreeMap::from([(second, COUNT), (broadcast, COUNT)]),
        "an outside client's address, once node 2 no longer has it"
    );
    assert_eq!(
        foreign(status()),
        u64::from(2 * COUNT),
        "none of them counted"
    );
}
