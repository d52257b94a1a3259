//! BPF map entries for a validated configuration: pure functions, no maps.

use tapmesh_common::lb::{
    ByteMatch, FlowEntry, FlowMask, NatReplyData, PortIntervals, PortKey, PortNatKey, PortNatValue,
    SourceKey, Target, VipConfig, VipKey, LOOKUP_DST_PORTS, LOOKUP_SOURCES, LOOKUP_SRC_PORTS,
    MAX_BYTE_MATCHES, PORT_INTERVALS, PROTO_CLASSES, PROTO_ICMP, PROTO_OTHER, PROTO_SCTP,
    PROTO_TCP, PROTO_UDP, TARGET_LOCAL, TARGET_REMOTE,
};

use super::flows::{CompiledFlow, CompiledVip, PortTable, ProtoClass};
use super::model::{ValidLb, ValidVia};
use super::port_nat;
pub use crate::dataplane::lb::VipTables;
use crate::dataplane::lb::{
    FlowRef, LbInput, LbTables, NatReplyKey, StreamEntry, TargetEntry, VipEntry,
};
use crate::net::Prefix;

// `ProtoClass as usize` indexes `VipConfig::protocol_masks`.
const _: () = assert!(
    ProtoClass::Tcp as u8 == PROTO_TCP
        && ProtoClass::Udp as u8 == PROTO_UDP
        && ProtoClass::Sctp as u8 == PROTO_SCTP
        && ProtoClass::Icmp as u8 == PROTO_ICMP
        && ProtoClass::Other as u8 == PROTO_OTHER
        && ProtoClass::COUNT == PROTO_CLASSES
);

/// The map entries of a validated configuration, as the writer takes them
/// (ids, regions and interfaces are the writer's).
pub fn lb_tables(valid: &ValidLb) -> LbTables {
    LbTables {
        vip_prefixes: valid.vips.iter().filter(|v| v.prefix.len < 128).count() as u16,
        port_nat_replies: nat_replies(valid),
        vips: valid
            .vips
            .iter()
            .map(|vip| VipEntry {
                name: vip.name.clone(),
                key: vip_key(&vip.prefix),
                tables: with_port_nats(vip_tables(vip, 0, |_| 0, |_| 0), vip, valid),
                flows: vip
                    .flows
                    .iter()
                    .map(|f| FlowRef {
                        stream: f.stream.clone(),
                        flow: f.name.clone(),
                    })
                    .collect(),
            })
            .collect(),
        streams: valid
            .streams
            .iter()
            .map(|s| StreamEntry {
                name: s.name.clone(),
                table: s.table.clone(),
            })
            .collect(),
        flows: valid.flows.flows.iter().map(|f| f.name.clone()).collect(),
        targets: valid
            .targets
            .iter()
            .map(|t| TargetEntry {
                stream: t.stream.clone(),
                identifier: t.identifier,
                value: target_value(&t.via, 0, [0; 6], 0),
                interface: match &t.via {
                    ValidVia::Local { interface, .. } => Some(interface.clone()),
                    ValidVia::Remote { .. } => None,
                },
            })
            .collect(),
    }
}

impl LbInput for ValidLb {
    fn lb_tables(&self) -> std::borrow::Cow<'_, LbTables> {
        std::borrow::Cow::Owned(lb_tables(self))
    }
}

/// Adds the VIP's port NATs (under config id 0: a flow's index is its bit)
/// and marks the flows that have some.
fn with_port_nats(mut tables: VipTables, vip: &CompiledVip, valid: &ValidLb) -> VipTables {
    for (bit, f) in vip.flows.iter().enumerate() {
        for nat in port_nat::of_flow(&valid.port_nats, vip, &f.stream) {
            tables.port_nats.push((
                PortNatKey {
                    flow: bit as u32,
                    port: nat.port,
                    protocol: nat.protocol,
                    _pad: 0,
                },
                PortNatValue {
                    port: nat.target_port,
                    _pad: 0,
                },
            ));
            tables.flows[bit].port_nat = bit as u32 + 1;
        }
    }
    tables.port_nats.sort_by_key(|(k, _)| *k);
    tables
}

/// `tm_port_nat_rev`: (protocol, target port, VIP prefix) → the port, one
/// entry per VIP of each NAT (validation made them agree), sorted.
fn nat_replies(valid: &ValidLb) -> Vec<(NatReplyKey, PortNatValue)> {
    let mut out = std::collections::BTreeMap::new();
    for nat in valid.port_nats.values().flatten() {
        for vip in valid.vips.iter().filter(|v| nat.vips.contains(&v.name)) {
            let prefix = vip.prefix.mapped();
            let key = NatReplyKey {
                prefix_len: 32 + u32::from(prefix.len),
                data: NatReplyData {
                    protocol: nat.protocol,
                    _pad: 0,
                    port: nat.target_port.to_be_bytes(),
                    addr: prefix.octets(),
                },
            };
            out.insert(
                (key.prefix_len, key.data),
                PortNatValue {
                    port: nat.port,
                    _pad: 0,
                },
            );
        }
    }
    out.into_iter()
        .map(|((prefix_len, data), v)| (NatReplyKey { prefix_len, data }, v))
        .collect()
}

/// Key of `tm_vips` for a VIP prefix.
pub fn vip_key(prefix: &Prefix) -> VipKey {
    let prefix = prefix.mapped();
    VipKey {
        prefix_len: u32::from(prefix.len),
        addr: prefix.octets(),
    }
}

/// Entries for `vip` under `config_id`; `stream_id` and `flow_stats` map stream
/// and flow names to their ids.
pub fn vip_tables(
    vip: &CompiledVip,
    config_id: u32,
    stream_id: impl Fn(&str) -> u32,
    flow_stats: impl Fn(&str) -> u32,
) -> VipTables {
    let cid = config_id.to_be_bytes();
    let ports = |t: &PortTable| {
        t.prefixes
            .iter()
            .map(|p| {
                let key = PortKey {
                    prefix_len: 32 + u32::from(p.len),
                    config_id: cid,
                    port: p.port.to_be_bytes(),
                    _pad: [0; 2],
                };
                (key, FlowMask { mask: p.mask })
            })
            .collect()
    };
    let sources = vip
        .sources
        .entries
        .iter()
        .map(|e| {
            let key = SourceKey {
                prefix_len: 32 + u32::from(e.prefix.len),
                config_id: cid,
                addr: e.prefix.octets(),
            };
            (key, FlowMask { mask: e.mask })
        })
        .collect();
    let flows = vip
        .flows
        .iter()
        .map(|f| flow_entry(f, stream_id(&f.stream), flow_stats(&f.name)))
        .collect();
    // Port tables small enough live in the config (binary searched); a
    // source table that is only /0 needs no lookup either.
    let inline = |t: &PortTable| {
        (t.intervals.len() <= PORT_INTERVALS).then(|| {
            let mut p = PortIntervals::default();
            for (i, interval) in t.intervals.iter().enumerate() {
                p.starts[i] = interval.lo;
                p.masks[i] = interval.mask;
            }
            p.count = t.intervals.len() as u32;
            p
        })
    };
    let whole_sources = match vip.sources.entries.as_slice() {
        [only] if only.prefix.len == 0 => Some(only.mask),
        _ => None,
    };
    let (dst_inline, src_inline) = (inline(&vip.dst_ports), inline(&vip.src_ports));
    let mut lookups = 0;
    if dst_inline.is_none() {
        lookups |= LOOKUP_DST_PORTS;
    }
    if src_inline.is_none() {
        lookups |= LOOKUP_SRC_PORTS;
    }
    if whole_sources.is_none() {
        lookups |= LOOKUP_SOURCES;
    }
    VipTables {
        config: VipConfig {
            protocol_masks: vip.protocol_masks,
            // At most 64 flows (checked by the flow compiler).
            flow_count: vip.flows.len() as u32,
            lookups,
            sources_all: whole_sources.unwrap_or(0),
            port_free: port_free(&vip.dst_ports) & port_free(&vip.src_ports),
            dst_ports: dst_inline.unwrap_or_default(),
            src_ports: src_inline.unwrap_or_default(),
        },
        dst_ports: ports(&vip.dst_ports),
        src_ports: ports(&vip.src_ports),
        sources,
        flows,
        port_nats: Vec::new(),
    }
}

/// Flows in every interval of a port table: those that restrict no port.
fn port_free(t: &PortTable) -> u64 {
    t.intervals.iter().fold(u64::MAX, |m, i| m & i.mask)
}

fn flow_entry(f: &CompiledFlow, stream_id: u32, stats_index: u32) -> FlowEntry {
    let mut entry = FlowEntry {
        stream_id,
        stats_index,
        ..Default::default()
    };
    if f.byte_matches.len() > MAX_BYTE_MATCHES {
        // `validate` rejects this; fail closed: a match no packet passes
        // (mask 0 never equals value 1).
        entry.byte_match_count = 1;
        entry.byte_matches[0] = ByteMatch {
            len: 1,
            value: 1,
            ..Default::default()
        };
        return entry;
    }
    for (slot, b) in entry.byte_matches.iter_mut().zip(&f.byte_matches) {
        *slot = ByteMatch {
            offset: b.offset,
            len: b.nbytes,
            protocol: b.protocol.class() as u8,
            mask: b.mask,
            value: b.value,
        };
    }
    entry.byte_match_count = f.byte_matches.len() as u32;
    entry
}

/// Value of `tm_targets`; `ifindex` and `our_mac` are used by local targets only.
pub fn target_value(via: &ValidVia, ifindex: u32, our_mac: [u8; 6], stats_index: u32) -> Target {
    match via {
        ValidVia::Local { mac, .. } => Target {
            kind: TARGET_LOCAL,
            ifindex,
            stats_index,
            dst_mac: *mac,
            src_mac: our_mac,
            ..Default::default()
        },
        ValidVia::Remote { node } => Target {
            kind: TARGET_REMOTE,
            stats_index,
            node_addr: node.to_ipv6_mapped().octets(),
            ..Default::default()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lb::flows::{FlowSpec, PacketView, VipSpec};
    use crate::lb::model::{validate, LbSpec, StreamSpec, ValidLb};
    use std::collections::{HashMap, HashSet};
    use std::net::{Ipv4Addr, Ipv6Addr};
    use tapmesh_common::lb::{VipValue, MAX_FLOWS_PER_VIP};

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    /// The bytes the kernel sees (every map type is padding-free `Pod`).
    fn bytes<T: aya::Pod>(v: &T) -> &[u8] {
        // SAFETY: Pod types are repr(C) with no padding (assert_layout! in common).
        unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }
    }

    fn v4(a: &str) -> [u8; 16] {
        a.parse::<Ipv4Addr>().unwrap().to_ipv6_mapped().octets()
    }

    fn v6(a: &str) -> [u8; 16] {
        a.parse::<Ipv6Addr>().unwrap().octets()
    }

    fn lb(vips: &[(&str, &str)], streams: &[&str], flows: Vec<FlowSpec>) -> ValidLb {
        validate(&LbSpec {
            vips: vips
                .iter()
                .map(|(n, a)| VipSpec {
                    name: n.to_string(),
                    address: a.to_string(),
                })
                .collect(),
            streams: streams
                .iter()
                .map(|n| StreamSpec {
                    name: n.to_string(),
                    max_targets: 1,
                    table_size: None,
                    port_nats: Vec::new(),
                })
                .collect(),
            flows,
            targets: vec![],
        })
        .unwrap()
    }

    #[test]
    fn vip_keys() {
        let k = vip_key(&Prefix::parse_host_or_prefix("20.0.0.1").unwrap());
        assert_eq!(k.prefix_len, 128);
        assert_eq!(k.addr, v4("20.0.0.1"));
        let k = vip_key(&Prefix::parse_host_or_prefix("2001:db8::/64").unwrap());
        assert_eq!((k.prefix_len, k.addr), (64, v6("2001:db8::")));
        let k = vip_key(&Prefix::parse_host_or_prefix("::/0").unwrap());
        assert_eq!(k, VipKey::default());
        let k = vip_key(&Prefix::parse_host_or_prefix("20.0.0.0/24").unwrap());
        assert_eq!(
            bytes(&k),
            [120, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 20, 0, 0, 0]
        );
    }

    #[test]
    fn key_encodings() {
        let f = FlowSpec {
            name: "f".into(),
            vips: s(&["v"]),
            stream: "st".into(),
            protocols: s(&["tcp"]),
            destination_port_ranges: s(&["80-81"]),
            source_subnets: s(&["10.1.0.0/16"]),
            byte_matches: s(&["tcp[2:2] = 5001"]),
            ..Default::default()
        };
        let lb = lb(&[("v", "20.0.0.1")], &["st"], vec![f]);
        let t = vip_tables(&lb.vips[0], 0x0102_0304, |_| 7, |_| 9);
        let cid = [1, 2, 3, 4];

        assert_eq!(
            t.config,
            VipConfig {
                protocol_masks: [1, 0, 0, 0, 0],
                flow_count: 1,
                // Sources are restricted; both port tables fit inline.
                lookups: LOOKUP_SOURCES,
                sources_all: 0,
                // The flow restricts the destination port.
                port_free: 0,
                dst_ports: {
                    let mut p = PortIntervals::default();
                    p.starts[..3].copy_from_slice(&[0, 80, 82]);
                    p.masks[..3].copy_from_slice(&[0, 1, 0]);
                    p.count = 3;
                    p
                },
                src_ports: {
                    let mut p = PortIntervals::default();
                    p.masks[0] = 1;
                    p.count = 1;
                    p
                },
            }
        );

        let hits: Vec<_> = t.dst_ports.iter().filter(|(_, m)| m.mask == 1).collect();
        assert_eq!(
            hits,
            [&(
                PortKey {
                    prefix_len: 32 + 15,
                    config_id: cid,
                    port: [0, 80],
                    _pad: [0; 2]
                },
                FlowMask { mask: 1 }
            )]
        );
        assert_eq!(
            bytes(&hits[0].0),
            [47, 0, 0, 0, 1, 2, 3, 4, 0, 80, 0, 0],
            "prefix_len host order, then config id and port big-endian"
        );
        // The other ports: 0..=79 and 82..=65535, as prefixes with mask 0.
        assert_eq!(t.dst_ports.len(), lb.vips[0].dst_ports.prefixes.len());
        assert!(t.dst_ports.contains(&(
            PortKey {
                prefix_len: 32 + 10,
                config_id: cid,
                port: [0, 0],
                _pad: [0; 2]
            },
            FlowMask { mask: 0 }
        )));
        assert!(t.dst_ports.iter().all(|(k, _)| k.config_id == cid));

        // Unrestricted source ports: one /0 entry.
        assert_eq!(
            t.src_ports,
            [(
                PortKey {
                    prefix_len: 32,
                    config_id: cid,
                    port: [0, 0],
                    _pad: [0; 2]
                },
                FlowMask { mask: 1 }
            )]
        );

        assert_eq!(
            t.sources,
            [
                (
                    SourceKey {
                        prefix_len: 32,
                        config_id: cid,
                        addr: [0; 16]
                    },
                    FlowMask { mask: 0 }
                ),
                (
                    SourceKey {
                        prefix_len: 32 + 96 + 16,
                        config_id: cid,
                        addr: v4("10.1.0.0")
                    },
                    FlowMask { mask: 1 }
                )
            ]
        );
        let mut want = vec![144, 0, 0, 0, 1, 2, 3, 4];
        want.extend([0; 10]);
        want.extend([0xff, 0xff, 10, 1, 0, 0]);
        assert_eq!(bytes(&t.sources[1].0), want);

        let mut entry = FlowEntry {
            stream_id: 7,
            stats_index: 9,
            byte_match_count: 1,
            ..Default::default()
        };
        entry.byte_matches[0] = ByteMatch {
            offset: 2,
            len: 2,
            protocol: PROTO_TCP,
            mask: 0xffff,
            value: 5001,
        };
        assert_eq!(t.flows, [entry]);
        assert_eq!(
            &bytes(&t.flows[0])[..28],
            [
                7, 0, 0, 0, 9, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, // ids, count, pad
                2, 0, 2, 0, 0xff, 0xff, 0, 0, 0x89, 0x13, 0,
                0 // offset, len, proto, mask, value
            ]
        );
        assert!(bytes(&t.flows[0])[28..].iter().all(|&b| b == 0));
    }

    #[test]
    fn flow_entries_follow_bits_and_names() {
        let flow = |name: &str, prio: i32, stream: &str, bms: &[&str]| FlowSpec {
            name: name.into(),
            vips: s(&["v"]),
            stream: stream.into(),
            priority: prio,
            byte_matches: s(bms),
            ..Default::default()
        };
        let lb = lb(
            &[("v", "2001:db8::1")],
            &["a", "b"],
            vec![
                flow("low", 1, "a", &[]),
                flow(
                    "high",
                    9,
                    "b",
                    &[
                        "udp[0:1] = 1",
                        "udp[1:4] & 0xff = 2",
                        "udp[3:1] = 3",
                        "udp[511:2] = 4",
                    ],
                ),
            ],
        );
        let ids = |n: &str| if n == "a" { 10 } else { 20 };
        let stats = |n: &str| if n == "low" { 100 } else { 200 };
        let t = vip_tables(&lb.vips[0], 3, ids, stats);
        assert_eq!(t.config.flow_count, 2);
        assert_eq!(t.config.protocol_masks, [0b11; 5]);
        let high = &t.flows[0];
        assert_eq!(
            (high.stream_id, high.stats_index, high.byte_match_count),
            (20, 200, 4)
        );
        let bm = |offset, len, protocol, mask, value| ByteMatch {
            offset,
            len,
            protocol,
            mask,
            value,
        };
        assert_eq!(
            high.byte_matches,
            [
                bm(0, 1, PROTO_UDP, 0xff, 1),
                bm(1, 4, PROTO_UDP, 0xff, 2),
                bm(3, 1, PROTO_UDP, 0xff, 3),
                bm(511, 2, PROTO_UDP, 0xffff, 4),
            ]
        );
        assert_eq!(
            t.flows[1],
            FlowEntry {
                stream_id: 10,
                stats_index: 100,
                ..Default::default()
            }
        );
    }

    #[test]
    fn too_many_byte_matches_fail_closed() {
        let lb = lb(
            &[("v", "20.0.0.1")],
            &["a"],
            vec![FlowSpec {
                name: "f".into(),
                vips: s(&["v"]),
                stream: "a".into(),
                byte_matches: s(&["udp[0:1] = 1"]),
                ..Default::default()
            }],
        );
        let mut vip = lb.vips[0].clone();
        vip.flows[0].byte_matches = vec![vip.flows[0].byte_matches[0]; 5];
        let e = vip_tables(&vip, 0, |_| 1, |_| 2).flows[0];
        assert_eq!(e.byte_match_count, 1);
        let m = e.byte_matches[0];
        assert_ne!(m.mask & m.value, m.value, "no word passes");
    }

    #[test]
    fn target_values() {
        let local = ValidVia::Local {
            interface: "veth1".into(),
            mac: [2, 0, 0, 0, 0, 1],
        };
        let t = target_value(&local, 42, [2, 0, 0, 0, 0, 0xaa], 5);
        assert_eq!(
            t,
            Target {
                kind: TARGET_LOCAL,
                ifindex: 42,
                stats_index: 5,
                mtu: 0,
                dst_mac: [2, 0, 0, 0, 0, 1],
                src_mac: [2, 0, 0, 0, 0, 0xaa],
                hop_flags: 0,
                _pad2: [0; 3],
                node_addr: [0; 16]
            }
        );
        let remote = ValidVia::Remote {
            node: Ipv4Addr::new(192, 0, 2, 7),
        };
        let t = target_value(&remote, 42, [2, 0, 0, 0, 0, 0xaa], 6);
        let mut want = vec![2, 0, 0, 0, 0, 0, 0, 0, 6, 0, 0, 0, 0, 0, 0, 0];
        want.extend([0; 16]); // MACs and pad
        want.extend([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 0, 2, 7]);
        assert_eq!(bytes(&t), want);
    }

    // ---- kernel mirror: the XDP lookups emulated over the generated entries ----

    struct Rng(u64);

    impl Rng {
        // splitmix64
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn pick<T: Copy>(&mut self, v: &[T]) -> T {
            v[self.below(v.len() as u64) as usize]
        }
    }

    /// An LPM trie: the key's first 4 bytes are prefix_len (bits), the rest the data.
    struct Lpm<V>(Vec<(Vec<u8>, V)>);

    fn split(key: &[u8]) -> (u32, &[u8]) {
        let (len, data) = key.split_at(4);
        (u32::from_ne_bytes(len.try_into().unwrap()), data)
    }

    fn same_bits(a: &[u8], b: &[u8], bits: u32) -> bool {
        (0..bits as usize).all(|i| (a[i / 8] ^ b[i / 8]) & (0x80 >> (i % 8)) == 0)
    }

    impl<V: Copy> Lpm<V> {
        fn new() -> Self {
            Self(Vec::new())
        }

        /// Inserts like the kernel: host bits are ignored, so a same-prefix key
        /// would replace an entry; the tables must never do that.
        fn insert<K: aya::Pod>(&mut self, key: &K, value: V) {
            let key = bytes(key).to_vec();
            let (len, data) = split(&key);
            assert!(len as usize <= 8 * data.len());
            let clash = self.0.iter().any(|(k, _)| {
                let (l, d) = split(k);
                l == len && same_bits(d, data, len)
            });
            assert!(!clash, "duplicate LPM prefix {key:?}");
            self.0.push((key, value));
        }

        fn lookup<K: aya::Pod>(&self, key: &K) -> Option<V> {
            let (len, data) = split(bytes(key));
            self.0
                .iter()
                .filter(|(k, _)| {
                    let (l, d) = split(k);
                    l <= len && same_bits(d, data, l)
                })
                .max_by_key(|(k, _)| split(k).0)
                .map(|&(_, v)| v)
        }
    }

    struct Kernel {
        vips: Lpm<VipValue>,
        configs: HashMap<u32, VipConfig>,
        dst_ports: Lpm<FlowMask>,
        src_ports: Lpm<FlowMask>,
        sources: Lpm<FlowMask>,
        flows: HashMap<u32, FlowEntry>,
    }

    impl Kernel {
        fn new() -> Self {
            Self {
                vips: Lpm::new(),
                configs: HashMap::new(),
                dst_ports: Lpm::new(),
                src_ports: Lpm::new(),
                sources: Lpm::new(),
                flows: HashMap::new(),
            }
        }

        fn load(&mut self, config_id: u32, t: &VipTables) {
            self.configs.insert(config_id, t.config);
            for (k, m) in &t.dst_ports {
                self.dst_ports.insert(k, *m);
            }
            for (k, m) in &t.src_ports {
                self.src_ports.insert(k, *m);
            }
            for (k, m) in &t.sources {
                self.sources.insert(k, *m);
            }
            for (bit, e) in t.flows.iter().enumerate() {
                self.flows
                    .insert(config_id * MAX_FLOWS_PER_VIP + bit as u32, *e);
            }
        }

        /// (stream_id, stats_index) of the flow the XDP program would pick.
        fn classify(&self, dst: [u8; 16], p: &PacketView) -> Option<(u32, u32)> {
            let vip = self.vips.lookup(&VipKey {
                prefix_len: 128,
                addr: dst,
            })?;
            let cfg = self.configs.get(&vip.config_id)?;
            let v6 = dst[..12] != [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];
            let class = match (p.protocol, v6) {
                (6, _) => PROTO_TCP,
                (17, _) => PROTO_UDP,
                (132, _) => PROTO_SCTP,
                (1, false) | (58, true) => PROTO_ICMP,
                _ => PROTO_OTHER,
            };
            let (sp, dp) = if class <= PROTO_SCTP {
                (p.src_port, p.dst_port)
            } else {
                (0, 0)
            };
            let cid = vip.config_id.to_be_bytes();
            let port_key = |port: u16| PortKey {
                prefix_len: 48,
                config_id: cid,
                port: port.to_be_bytes(),
                _pad: [0; 2],
            };
            let mask = |m: Option<FlowMask>| m.map_or(0, |m| m.mask);
            let source = SourceKey {
                prefix_len: 160,
                config_id: cid,
                addr: p.src,
            };
            let table = |bit: u32, inline: u64, found: Option<FlowMask>| {
                if cfg.lookups & bit != 0 {
                    mask(found)
                } else {
                    inline
                }
            };
            let interval = |p: &PortIntervals, port: u16| {
                let n = p.count as usize;
                (0..n)
                    .rev()
                    .find(|&i| p.starts[i] <= port)
                    .map_or(0, |i| p.masks[i])
            };
            let mut m = cfg.protocol_masks[usize::from(class)]
                & table(
                    LOOKUP_DST_PORTS,
                    interval(&cfg.dst_ports, dp),
                    self.dst_ports.lookup(&port_key(dp)),
                )
                & table(
                    LOOKUP_SRC_PORTS,
                    interval(&cfg.src_ports, sp),
                    self.src_ports.lookup(&port_key(sp)),
                )
                & table(
                    LOOKUP_SOURCES,
                    cfg.sources_all,
                    self.sources.lookup(&source),
                );
            if cfg.flow_count < 64 {
                m &= (1u64 << cfg.flow_count) - 1;
            }
            while m != 0 {
                let e = self
                    .flows
                    .get(&(vip.config_id * MAX_FLOWS_PER_VIP + m.trailing_zeros()))?;
                let pass = e.byte_matches[..e.byte_match_count as usize]
                    .iter()
                    .all(|b| {
                        let (o, n) = (usize::from(b.offset), usize::from(b.len));
                        b.protocol == class
                            && p.l4.get(o..o + n).is_some_and(|w| {
                                w.iter().fold(0u32, |a, &x| a << 8 | u32::from(x)) & b.mask
                                    == b.value
                            })
                    });
                if pass {
                    return Some((e.stream_id, e.stats_index));
                }
                m &= m - 1;
            }
            None
        }
    }

    fn mirror_lb() -> ValidLb {
        let flow = |name: &str, vips: &[&str], stream: &str, prio: i32| FlowSpec {
            name: name.into(),
            vips: s(vips),
            stream: stream.into(),
            priority: prio,
            ..Default::default()
        };
        let both = &["v4", "v6"][..];
        lb(
            &[("v4", "20.0.0.0/24"), ("v6", "2001:db8::/64")],
            &["a", "b"],
            vec![
                FlowSpec {
                    protocols: s(&["tcp"]),
                    destination_port_ranges: s(&["80", "443", "8000-8080"]),
                    ..flow("web", both, "a", 10)
                },
                FlowSpec {
                    protocols: s(&["tcp"]),
                    destination_port_ranges: s(&["8000-8999"]),
                    source_subnets: s(&["10.0.0.0/8", "192.168.0.0/16"]),
                    ..flow("web-internal", &["v4"], "b", 20)
                },
                FlowSpec {
                    protocols: s(&["udp"]),
                    destination_port_ranges: s(&["53"]),
                    byte_matches: s(&["udp[10:1] & 0x80 = 0"]),
                    ..flow("dns", both, "b", 10)
                },
                FlowSpec {
                    protocols: s(&["sctp", "udp"]),
                    destination_port_ranges: s(&["3868"]),
                    source_port_ranges: s(&["1024-65535"]),
                    byte_matches: s(&["sctp[12:2] & 0x0300 = 0x0100"]),
                    ..flow("diameter", both, "a", 5)
                },
                FlowSpec {
                    protocols: s(&["icmp"]),
                    ..flow("icmp", both, "a", 1)
                },
                FlowSpec {
                    source_subnets: s(&["2001:db8:1::/48", "2001:db8:1:2::/64"]),
                    ..flow("v6-subnet", &["v6"], "b", 3)
                },
                FlowSpec {
                    source_subnets: s(&["10.1.0.0/16"]),
                    ..flow("v4-subnet", &["v4"], "a", 0)
                },
            ],
        )
    }

    fn rand_src(r: &mut Rng, v6: bool) -> [u8; 16] {
        let base = if v6 {
            u128::from_be_bytes(r.pick(&[
                self::v6("2001:db8:1::"),
                self::v6("2001:db8:1:2::"),
                self::v6("2001:db8:2::"),
            ]))
        } else {
            u128::from_be_bytes(r.pick(&[
                v4("10.0.0.0"),
                v4("10.1.0.0"),
                v4("192.168.0.0"),
                v4("1.2.3.0"),
            ]))
        };
        let host_bits = if v6 { r.below(81) } else { r.below(25) } as u32;
        let noise = (u128::from(r.next()) << 64 | u128::from(r.next())) >> (128 - host_bits.max(1));
        (base ^ if host_bits == 0 { 0 } else { noise }).to_be_bytes()
    }

    fn rand_port(r: &mut Rng) -> u16 {
        let p = r.pick(&[0u16, 53, 80, 443, 1023, 1024, 3868, 8000, 8080, 8999, 65535]);
        match r.below(5) {
            0 => r.below(0x10000) as u16,
            1 => p.wrapping_add(1),
            2 => p.wrapping_sub(1),
            _ => p,
        }
    }

    #[test]
    fn kernel_mirror_agrees_with_classify() {
        let lb = mirror_lb();
        let stream_id = |n: &str| 7 + lb.streams.iter().position(|s| s.name == n).unwrap() as u32;
        let flow_stats =
            |n: &str| 100 + lb.flows.flows.iter().position(|f| f.name == n).unwrap() as u32;

        // VIP i runs config 2i + 1; config 2i holds the other VIP's tables, which
        // the config id in every key must keep apart.
        let mut k = Kernel::new();
        for (i, vip) in lb.vips.iter().enumerate() {
            let i = i as u32;
            k.vips.insert(
                &vip_key(&vip.prefix),
                VipValue {
                    vip_index: i,
                    config_id: 2 * i + 1,
                },
            );
            k.load(
                2 * i + 1,
                &vip_tables(vip, 2 * i + 1, stream_id, flow_stats),
            );
            let other = &lb.vips[1 - i as usize];
            k.load(2 * i, &vip_tables(other, 2 * i, stream_id, flow_stats));
        }

        let mut r = Rng(0x7a9_3e54);
        let mut hit = HashSet::new();
        let (mut misses, mut no_vip) = (0, 0);
        for _ in 0..3000 {
            let (dst, v6) = match r.below(20) {
                0 => (v4("21.0.0.1"), false),
                1 => (self::v6("2001:db9::1"), true),
                n if n % 2 == 0 => {
                    let mut a = v4("20.0.0.0");
                    a[15] = r.next() as u8;
                    (a, false)
                }
                _ => {
                    let mut a = self::v6("2001:db8::");
                    a[8..].copy_from_slice(&r.next().to_be_bytes());
                    (a, true)
                }
            };
            let l4: Vec<u8> = (0..r.below(16))
                .map(|_| {
                    let any = r.next() as u8;
                    r.pick(&[0u8, 1, 0x80, 0x81, 0xff, any])
                })
                .collect();
            let src_v6 = v6 != (r.below(10) == 0);
            let p = PacketView {
                protocol: r.pick(&[6u8, 6, 17, 17, 132, 1, 58, 47]),
                src: rand_src(&mut r, src_v6),
                src_port: rand_port(&mut r),
                dst_port: rand_port(&mut r),
                l4: &l4,
            };
            let reference = lb.vips.iter().find(|v| v.prefix.contains(dst.into()));
            let want = reference
                .and_then(|v| v.classify(&p))
                .map(|f| (stream_id(&f.stream), flow_stats(&f.name)));
            let got = k.classify(dst, &p);
            assert_eq!(got, want, "dst {dst:?} packet {p:?}");
            match (reference, got) {
                (None, _) => no_vip += 1,
                (Some(_), None) => misses += 1,
                (Some(_), Some((_, stats))) => {
                    hit.insert(stats);
                }
            }
        }
        // Not vacuous: every flow won some packet, and some packets matched nothing.
        assert_eq!(hit.len(), lb.flows.flows.len(), "{hit:?}");
        assert!(misses > 200 && no_vip > 50, "{misses} {no_vip}");
    }
}
