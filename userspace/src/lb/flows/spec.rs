//! Flow and VIP model (Meridio nsp.v1 compatible), parsing and validation.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use tapmesh_common::lb::MAX_MATCH_OFFSET;

use crate::names::{validate_name, NameError};
use crate::net::Prefix;

/// Most flows one VIP may carry (the classifier uses u64 masks).
pub const MAX_FLOWS_PER_VIP: usize = tapmesh_common::lb::MAX_FLOWS_PER_VIP as usize;

/// A flow as written in configuration (nsp.v1 Flow).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FlowSpec {
    pub name: String,
    pub source_subnets: Vec<String>,
    pub destination_port_ranges: Vec<String>,
    pub source_port_ranges: Vec<String>,
    pub protocols: Vec<String>,
    pub priority: i32,
    pub stream: String,
    pub vips: Vec<String>,
    pub byte_matches: Vec<String>,
}

/// A VIP as written in configuration: a host address or a prefix.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VipSpec {
    pub name: String,
    pub address: String,
}

/// Validation error; every message names the offending flow/VIP and field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FlowError {
    #[error("{field}: bad name {value:?}: {reason}; use 1-253 characters from [A-Za-z0-9-+_.]")]
    BadName {
        field: String,
        value: String,
        reason: &'static str,
    },
    #[error("flow {flow:?} source_subnets: bad CIDR {value:?}: {reason}; use e.g. \"10.0.0.0/24\" or \"2001::/32\"")]
    BadCidr {
        flow: String,
        value: String,
        reason: &'static str,
    },
    #[error("flow {flow:?} {field}: bad port range {value:?}; use \"N\", \"A-B\" with 0 <= A <= B <= 65535, or \"any\"")]
    BadPortRange {
        flow: String,
        field: &'static str,
        value: String,
    },
    #[error("flow {flow:?} {field}: port ranges need protocols, all of them tcp, udp or sctp")]
    PortsNeedProtocols { flow: String, field: &'static str },
    #[error("flow {flow:?} protocols: unknown protocol {value:?}; use tcp, udp, sctp or icmp")]
    UnknownProtocol { flow: String, value: String },
    #[error("flow {flow:?} protocols: protocol {value:?} listed twice; list it once")]
    DuplicateProtocol { flow: String, value: String },
    #[error("flow {flow:?} priority: {priority} is negative; use a value >= 0")]
    NegativePriority { flow: String, priority: i32 },
    #[error("flow {flow:?} byte_matches: bad byte match {value:?}: {reason}; use e.g. \"tcp[2:2] = 5001\" or \"udp[0:4] & 0xffff = 0x50\"")]
    BadByteMatch {
        flow: String,
        value: String,
        reason: String,
    },
    #[error("flow {flow:?} byte_matches: {value:?} can never match: {reason}")]
    ByteMatchNeverMatches {
        flow: String,
        value: String,
        reason: String,
    },
    #[error("flow {flow:?} vips: unknown VIP {vip:?}; define it or remove it from the flow")]
    UnknownVip { flow: String, vip: String },
    #[error("flow {flow:?} is defined twice; flow names must be unique")]
    DuplicateFlow { flow: String },
    #[error("VIP {vip:?} is defined twice; VIP names must be unique")]
    DuplicateVip { vip: String },
    #[error("VIP {vip:?} address: bad address {value:?}: {reason}; use e.g. \"20.0.0.1\", \"2001:db8::1\" or \"20.0.0.0/24\"")]
    BadVipAddress {
        vip: String,
        value: String,
        reason: &'static str,
    },
    #[error("VIP {vip:?} has {count} flows; at most {MAX_FLOWS_PER_VIP} are supported, remove some or spread them over VIPs")]
    TooManyFlows { vip: String, count: usize },
}

/// An L4 protocol a flow may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
    /// ICMP on IPv4 VIPs, ICMPv6 on IPv6 VIPs.
    Icmp,
}

impl Protocol {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "tcp" => Some(Self::Tcp),
            "udp" => Some(Self::Udp),
            "sctp" => Some(Self::Sctp),
            "icmp" => Some(Self::Icmp),
            _ => None,
        }
    }

    pub fn class(self) -> ProtoClass {
        match self {
            Self::Tcp => ProtoClass::Tcp,
            Self::Udp => ProtoClass::Udp,
            Self::Sctp => ProtoClass::Sctp,
            Self::Icmp => ProtoClass::Icmp,
        }
    }

    /// True for protocols with ports.
    pub fn has_ports(self) -> bool {
        self != Self::Icmp
    }
}

/// Packet protocol class; the index into `CompiledVip::protocol_masks`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProtoClass {
    Tcp = 0,
    Udp = 1,
    Sctp = 2,
    Icmp = 3,
    Other = 4,
}

impl ProtoClass {
    pub const COUNT: usize = 5;

    /// Class of IP protocol number `proto` for a VIP of the given family.
    pub fn of(proto: u8, v6: bool) -> Self {
        match proto {
            6 => Self::Tcp,
            17 => Self::Udp,
            132 => Self::Sctp,
            1 if !v6 => Self::Icmp,
            58 if v6 => Self::Icmp,
            _ => Self::Other,
        }
    }

    pub fn has_ports(self) -> bool {
        matches!(self, Self::Tcp | Self::Udp | Self::Sctp)
    }
}

/// An inclusive port range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    pub const ANY: Self = Self {
        lo: 0,
        hi: u16::MAX,
    };

    /// Parses "80", "3000-4000" or "any".
    pub fn parse(s: &str) -> Option<Self> {
        if s == "any" {
            return Some(Self::ANY);
        }
        let (a, b) = s.split_once('-').unwrap_or((s, s));
        let (lo, hi) = (parse_dec_u16(a)?, parse_dec_u16(b)?);
        (lo <= hi).then_some(Self { lo, hi })
    }

    pub fn contains(&self, port: u16) -> bool {
        self.lo <= port && port <= self.hi
    }
}

fn parse_dec_u16(s: &str) -> Option<u16> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// A VIP or source subnet where the LB's maps keep it: in the 16-byte
/// space (IPv4 as `::ffff:a.b.c.d`, length + 96), host bits cleared.
fn lb_prefix(prefix: Prefix) -> Prefix {
    prefix.mapped().network()
}

/// One tcpdump-like byte match: `(be(l4[offset..offset+nbytes]) & mask) == value`,
/// only on packets of `protocol`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ByteMatch {
    pub protocol: Protocol,
    pub offset: u16,
    pub nbytes: u8,
    pub mask: u32,
    pub value: u32,
}

impl ByteMatch {
    /// Parses `^(sctp|tcp|udp)\[[0-9]+ *: *[124]\]( *& *0x[0-9a-f]+)? *= *([0-9]+|0x[0-9a-f]+)$`
    /// and checks that mask and value fit in nbytes.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut c = Cursor(s.as_bytes());
        let protocol = if c.eat("sctp") {
            Protocol::Sctp
        } else if c.eat("tcp") {
            Protocol::Tcp
        } else if c.eat("udp") {
            Protocol::Udp
        } else {
            return Err("must start with tcp, udp or sctp".into());
        };
        c.expect("[")?;
        let (offset, text) = c.number(10).ok_or("missing offset")?;
        let offset = u16::try_from(offset)
            .ok()
            .filter(|o| *o < MAX_MATCH_OFFSET)
            .ok_or_else(|| {
                format!(
                    "offset {text} too large (the L4 header is read up to {} bytes)",
                    MAX_MATCH_OFFSET
                )
            })?;
        c.spaces();
        c.expect(":")?;
        c.spaces();
        let nbytes = match c.0.first() {
            Some(b @ (b'1' | b'2' | b'4')) => b - b'0',
            _ => return Err("size must be 1, 2 or 4".into()),
        };
        c.0 = &c.0[1..];
        c.expect("]")?;
        let max = u64::MAX >> (64 - 8 * u32::from(nbytes));
        c.spaces();
        let mask = if c.eat("&") {
            c.spaces();
            c.expect("0x")?;
            let (m, text) = c.number(16).ok_or("mask needs hex digits 0-9a-f")?;
            if m > max {
                return Err(format!("mask 0x{text} does not fit in {nbytes} bytes"));
            }
            c.spaces();
            m
        } else {
            max
        };
        c.expect("=")?;
        c.spaces();
        let (value, text) = if c.eat("0x") {
            let (v, t) = c.number(16).ok_or("value needs hex digits 0-9a-f")?;
            (v, format!("0x{t}"))
        } else {
            c.number(10).ok_or("missing value")?
        };
        if !c.0.is_empty() {
            return Err("unexpected text after the value".into());
        }
        if value > max {
            return Err(format!("value {text} does not fit in {nbytes} bytes"));
        }
        // Both fit in nbytes <= 4, so the casts are lossless.
        Ok(Self {
            protocol,
            offset,
            nbytes,
            mask: mask as u32,
            value: value as u32,
        })
    }

    /// Evaluates the match on an L4 slice of a packet of class `class`.
    pub fn matches(&self, class: ProtoClass, l4: &[u8]) -> bool {
        let start = usize::from(self.offset);
        let Some(bytes) = l4.get(start..start + usize::from(self.nbytes)) else {
            return false;
        };
        let word = bytes.iter().fold(0u32, |w, &b| (w << 8) | u32::from(b));
        class == self.protocol.class() && word & self.mask == self.value
    }
}

/// Minimal byte cursor for the byte-match grammar.
struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn eat(&mut self, s: &str) -> bool {
        let hit = self.0.starts_with(s.as_bytes());
        if hit {
            self.0 = &self.0[s.len()..];
        }
        hit
    }

    fn expect(&mut self, s: &str) -> Result<(), String> {
        if self.eat(s) {
            Ok(())
        } else {
            Err(format!("expected {s:?}"))
        }
    }

    fn spaces(&mut self) {
        while self.eat(" ") {}
    }

    /// Digits in `radix` (10, or 16 lowercase) and their text; None if none.
    /// Saturates at u64::MAX (then caught by the fits-in-nbytes check).
    fn number(&mut self, radix: u32) -> Option<(u64, String)> {
        let n = self
            .0
            .iter()
            .take_while(|&&b| b.is_ascii_digit() || (radix == 16 && (b'a'..=b'f').contains(&b)))
            .count();
        if n == 0 {
            return None;
        }
        let (digits, rest) = self.0.split_at(n);
        self.0 = rest;
        let value = digits.iter().fold(0u64, |acc, &b| {
            let d = (b as char).to_digit(radix).unwrap_or(0);
            acc.saturating_mul(u64::from(radix))
                .saturating_add(u64::from(d))
        });
        Some((value, String::from_utf8_lossy(digits).into_owned()))
    }
}

impl From<NameError> for FlowError {
    fn from(e: NameError) -> Self {
        FlowError::BadName {
            field: e.field,
            value: e.value,
            reason: e.reason,
        }
    }
}

/// A validated VIP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vip {
    pub name: String,
    pub prefix: Prefix,
    /// Address family as written (true for IPv6 literals).
    pub v6: bool,
}

impl Vip {
    pub fn parse(spec: &VipSpec) -> Result<Self, FlowError> {
        validate_name("VIP name", &spec.name)?;
        let prefix = Prefix::parse_host_or_prefix(&spec.address)
            .map(lb_prefix)
            .map_err(|e| FlowError::BadVipAddress {
                vip: spec.name.clone(),
                value: spec.address.clone(),
                reason: e.reason(),
            })?;
        let host = spec.address.split('/').next().unwrap_or_default();
        let v6 = host.parse::<Ipv4Addr>().is_err();
        // IPv4 VIPs share the maps' 16-byte space as `::ffff:a.b.c.d`.
        let mapped_space = Prefix::new(Ipv4Addr::UNSPECIFIED.to_ipv6_mapped(), 96);
        // (`::/0` is refused later with its own reason.)
        let overlaps = prefix.covers(&mapped_space) || mapped_space.covers(&prefix);
        if v6 && prefix.len != 0 && overlaps {
            return Err(FlowError::BadVipAddress {
                vip: spec.name.clone(),
                value: spec.address.clone(),
                reason: "an IPv6 VIP may not hold IPv4-mapped addresses (::ffff:0:0/96)",
            });
        }
        Ok(Self {
            name: spec.name.clone(),
            prefix,
            v6,
        })
    }
}

/// A validated flow. Empty `protocols`, `source_subnets` or port lists mean "any".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flow {
    pub name: String,
    pub stream: String,
    pub priority: u32,
    pub protocols: Vec<Protocol>,
    pub source_subnets: Vec<Prefix>,
    pub dst_ports: Vec<PortRange>,
    pub src_ports: Vec<PortRange>,
    pub vips: Vec<String>,
    pub byte_matches: Vec<ByteMatch>,
}

impl Flow {
    /// Validates one flow on its own (VIP references are checked by [`FlowSet::parse`]).
    pub fn parse(spec: &FlowSpec) -> Result<Self, FlowError> {
        let flow = spec.name.clone();
        validate_name("flow name", &spec.name)?;
        validate_name(&format!("flow {flow:?} stream"), &spec.stream)?;
        for vip in &spec.vips {
            validate_name(&format!("flow {flow:?} vips"), vip)?;
        }
        if spec.priority < 0 {
            return Err(FlowError::NegativePriority {
                flow,
                priority: spec.priority,
            });
        }

        let mut protocols = Vec::new();
        for p in &spec.protocols {
            let proto = Protocol::parse(p).ok_or_else(|| FlowError::UnknownProtocol {
                flow: flow.clone(),
                value: p.clone(),
            })?;
            if protocols.contains(&proto) {
                return Err(FlowError::DuplicateProtocol {
                    flow,
                    value: p.clone(),
                });
            }
            protocols.push(proto);
        }

        let mut source_subnets = Vec::new();
        for s in &spec.source_subnets {
            let p = s
                .parse::<Prefix>()
                .map(lb_prefix)
                .map_err(|e| FlowError::BadCidr {
                    flow: flow.clone(),
                    value: s.clone(),
                    reason: e.reason(),
                })?;
            source_subnets.push(p);
        }
        // All /0 (as written: v4 /0 is /96 in the mapped space) means any source.
        let zero_len = |s: &String| {
            s.split_once('/')
                .is_some_and(|(_, l)| l.bytes().all(|b| b == b'0'))
        };
        if spec.source_subnets.iter().all(zero_len) {
            source_subnets.clear();
        }
        source_subnets.sort();
        source_subnets.dedup();

        let dst_ports = parse_ports(
            &flow,
            "destination_port_ranges",
            &spec.destination_port_ranges,
        )?;
        let src_ports = parse_ports(&flow, "source_port_ranges", &spec.source_port_ranges)?;
        for (field, ports) in [
            ("destination_port_ranges", &dst_ports),
            ("source_port_ranges", &src_ports),
        ] {
            if !ports.is_empty()
                && (protocols.is_empty() || !protocols.iter().all(|p| p.has_ports()))
            {
                return Err(FlowError::PortsNeedProtocols { flow, field });
            }
        }

        let mut byte_matches = Vec::new();
        for b in &spec.byte_matches {
            let m = ByteMatch::parse(b).map_err(|reason| FlowError::BadByteMatch {
                flow: flow.clone(),
                value: b.clone(),
                reason,
            })?;
            // All of a flow's matches must pass, each on its own protocol's packets.
            let name = |p: Protocol| format!("{p:?}").to_lowercase();
            let reason = if !protocols.is_empty() && !protocols.contains(&m.protocol) {
                Some(format!(
                    "the flow's protocols do not include {}",
                    name(m.protocol)
                ))
            } else {
                byte_matches
                    .iter()
                    .find(|o: &&ByteMatch| o.protocol != m.protocol)
                    .map(|o| {
                        format!(
                            "the flow's other byte matches are on {} packets; a packet is one or the other",
                            name(o.protocol)
                        )
                    })
            };
            if let Some(reason) = reason {
                return Err(FlowError::ByteMatchNeverMatches {
                    flow: flow.clone(),
                    value: b.clone(),
                    reason,
                });
            }
            byte_matches.push(m);
        }

        let mut vips = spec.vips.clone();
        vips.sort();
        vips.dedup();
        Ok(Self {
            name: spec.name.clone(),
            stream: spec.stream.clone(),
            priority: spec.priority.unsigned_abs(),
            protocols,
            source_subnets,
            dst_ports,
            src_ports,
            vips,
            byte_matches,
        })
    }
}

/// Parses a port list; a list holding the full range ("any", "0-65535") means any (empty).
fn parse_ports(
    flow: &str,
    field: &'static str,
    list: &[String],
) -> Result<Vec<PortRange>, FlowError> {
    let mut out = Vec::new();
    for s in list {
        out.push(PortRange::parse(s).ok_or_else(|| FlowError::BadPortRange {
            flow: flow.to_string(),
            field,
            value: s.clone(),
        })?);
    }
    if out.contains(&PortRange::ANY) {
        out.clear();
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// A validated, cross-checked set of VIPs and flows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowSet {
    pub vips: Vec<Vip>,
    pub flows: Vec<Flow>,
}

impl FlowSet {
    /// Validates everything; the first error found is returned.
    pub fn parse(vips: &[VipSpec], flows: &[FlowSpec]) -> Result<Self, FlowError> {
        let mut set = FlowSet::default();
        let mut vip_names = HashSet::new();
        for v in vips {
            let vip = Vip::parse(v)?;
            if !vip_names.insert(vip.name.clone()) {
                return Err(FlowError::DuplicateVip { vip: vip.name });
            }
            set.vips.push(vip);
        }
        let mut flow_names = HashSet::new();
        for f in flows {
            let flow = Flow::parse(f)?;
            if !flow_names.insert(flow.name.clone()) {
                return Err(FlowError::DuplicateFlow { flow: flow.name });
            }
            if let Some(vip) = flow.vips.iter().find(|v| !vip_names.contains(*v)) {
                return Err(FlowError::UnknownVip {
                    flow: flow.name.clone(),
                    vip: vip.clone(),
                });
            }
            set.flows.push(flow);
        }
        for vip in &set.vips {
            check_flow_count(&vip.name, set.flows_of(&vip.name).count())?;
        }
        Ok(set)
    }

    /// Flows that reference VIP `vip`, in definition order.
    pub fn flows_of<'a>(&'a self, vip: &'a str) -> impl Iterator<Item = &'a Flow> + 'a {
        self.flows
            .iter()
            .filter(move |f| f.vips.iter().any(|v| v == vip))
    }
}

pub(crate) fn check_flow_count(vip: &str, count: usize) -> Result<(), FlowError> {
    if count > MAX_FLOWS_PER_VIP {
        return Err(FlowError::TooManyFlows {
            vip: vip.to_string(),
            count,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    fn flow(name: &str) -> FlowSpec {
        FlowSpec {
            name: name.into(),
            stream: "st".into(),
            vips: s(&["vip"]),
            ..Default::default()
        }
    }

    fn vips() -> Vec<VipSpec> {
        vec![VipSpec {
            name: "vip".into(),
            address: "20.0.0.1".into(),
        }]
    }

    fn pr(lo: u16, hi: u16) -> PortRange {
        PortRange { lo, hi }
    }

    #[test]
    fn port_ranges() {
        assert_eq!(PortRange::parse("80"), Some(pr(80, 80)));
        assert_eq!(PortRange::parse("90-95"), Some(pr(90, 95)));
        assert_eq!(PortRange::parse("any"), Some(PortRange::ANY));
        assert_eq!(PortRange::parse("0-65535"), Some(PortRange::ANY));
        assert_eq!(PortRange::parse("65535"), Some(pr(65535, 65535)));
        for bad in [
            "95-90",
            "70000",
            "0-65536",
            "",
            "-",
            "80-",
            "-80",
            "+80",
            " 80",
            "8 0",
            "1-2-3",
            "ANY",
            "0x50",
            "000000080",
        ] {
            assert_eq!(PortRange::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn flow_ports_any_and_protocol_rules() {
        let mut f = flow("f");
        f.destination_port_ranges = s(&["80", "any"]);
        let p = Flow::parse(&f).unwrap();
        assert!(
            p.dst_ports.is_empty(),
            "any => unrestricted, no protocol needed"
        );

        f.destination_port_ranges = s(&["0-65535"]);
        assert!(Flow::parse(&f).unwrap().dst_ports.is_empty());

        f.destination_port_ranges = s(&["90-95", "80"]);
        assert_eq!(
            Flow::parse(&f),
            Err(FlowError::PortsNeedProtocols {
                flow: "f".into(),
                field: "destination_port_ranges"
            })
        );
        f.protocols = s(&["tcp", "icmp"]);
        assert!(matches!(
            Flow::parse(&f),
            Err(FlowError::PortsNeedProtocols { .. })
        ));
        f.protocols = s(&["tcp", "sctp", "udp"]);
        assert_eq!(
            Flow::parse(&f).unwrap().dst_ports,
            vec![pr(80, 80), pr(90, 95)]
        );

        f.source_port_ranges = s(&["95-90"]);
        assert_eq!(
            Flow::parse(&f),
            Err(FlowError::BadPortRange {
                flow: "f".into(),
                field: "source_port_ranges",
                value: "95-90".into()
            })
        );
        f.source_port_ranges = s(&["70000"]);
        assert!(matches!(
            Flow::parse(&f),
            Err(FlowError::BadPortRange { .. })
        ));

        let mut g = flow("g");
        g.protocols = s(&["icmp"]);
        g.source_port_ranges = s(&["1000"]);
        assert_eq!(
            Flow::parse(&g),
            Err(FlowError::PortsNeedProtocols {
                flow: "g".into(),
                field: "source_port_ranges"
            })
        );
    }

    #[test]
    fn protocols() {
        let mut f = flow("f");
        f.protocols = s(&["tcp", "udp", "sctp", "icmp"]);
        assert_eq!(
            Flow::parse(&f).unwrap().protocols,
            vec![Protocol::Tcp, Protocol::Udp, Protocol::Sctp, Protocol::Icmp]
        );
        f.protocols = s(&["tcp", "gre"]);
        assert_eq!(
            Flow::parse(&f),
            Err(FlowError::UnknownProtocol {
                flow: "f".into(),
                value: "gre".into()
            })
        );
        f.protocols = s(&["TCP"]);
        assert!(matches!(
            Flow::parse(&f),
            Err(FlowError::UnknownProtocol { .. })
        ));
        f.protocols = s(&["udp", "tcp", "udp"]);
        assert_eq!(
            Flow::parse(&f),
            Err(FlowError::DuplicateProtocol {
                flow: "f".into(),
                value: "udp".into()
            })
        );
    }

    #[test]
    fn proto_class_by_family() {
        assert_eq!(ProtoClass::of(6, false), ProtoClass::Tcp);
        assert_eq!(ProtoClass::of(17, true), ProtoClass::Udp);
        assert_eq!(ProtoClass::of(132, true), ProtoClass::Sctp);
        assert_eq!(ProtoClass::of(1, false), ProtoClass::Icmp);
        assert_eq!(ProtoClass::of(1, true), ProtoClass::Other);
        assert_eq!(ProtoClass::of(58, true), ProtoClass::Icmp);
        assert_eq!(ProtoClass::of(58, false), ProtoClass::Other);
        assert_eq!(ProtoClass::of(47, false), ProtoClass::Other);
    }

    #[test]
    fn priority() {
        let mut f = flow("f");
        f.priority = -1;
        assert_eq!(
            Flow::parse(&f),
            Err(FlowError::NegativePriority {
                flow: "f".into(),
                priority: -1
            })
        );
        f.priority = 0;
        assert_eq!(Flow::parse(&f).unwrap().priority, 0);
        f.priority = i32::MAX;
        assert_eq!(Flow::parse(&f).unwrap().priority, i32::MAX as u32);
    }

    fn parse_cidr(s: &str) -> Result<Prefix, &'static str> {
        s.parse::<Prefix>()
            .map(lb_prefix)
            .map_err(crate::net::PrefixError::reason)
    }

    #[test]
    fn cidrs() {
        let v4 = parse_cidr("124.0.0.0/24").unwrap();
        assert_eq!(v4.len, 120);
        assert_eq!(
            v4.octets(),
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 124, 0, 0, 0]
        );
        assert!(v4.is_v4_mapped());
        let v6 = parse_cidr("2001::/32").unwrap();
        assert_eq!(v6.len, 32);
        assert_eq!(&v6.octets()[..4], &[0x20, 0x01, 0, 0]);
        assert!(!v6.is_v4_mapped());
        // Host bits are cleared.
        assert_eq!(
            parse_cidr("10.1.2.3/8").unwrap(),
            parse_cidr("10.0.0.0/8").unwrap()
        );
        assert_eq!(parse_cidr("0.0.0.0/0").unwrap().len, 96);
        assert_eq!(parse_cidr("::/0").unwrap().len, 0);
        assert_eq!(parse_cidr("1.2.3.4/32").unwrap().len, 128);
        assert_eq!(parse_cidr("::1/128").unwrap().len, 128);
        for bad in [
            "10.0.0.0",
            "10.0.0.0/33",
            "2001::/129",
            "10.0.0/8",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "10.0.0.0/ 8",
            "10.0.0.0/8/8",
            "host/8",
            "/8",
            "2001:::1/64",
            "10.0.0.0/1000",
        ] {
            assert!(parse_cidr(bad).is_err(), "{bad:?}");
        }

        let mut f = flow("f");
        f.source_subnets = s(&["10.0.0.0/8", "2001::/32"]);
        assert_eq!(Flow::parse(&f).unwrap().source_subnets.len(), 2);
        f.source_subnets = s(&["0.0.0.0/0", "::/0"]);
        assert!(
            Flow::parse(&f).unwrap().source_subnets.is_empty(),
            "all /0 => any"
        );
        f.source_subnets = s(&["0.0.0.0/0", "10.0.0.0/8"]);
        assert_eq!(Flow::parse(&f).unwrap().source_subnets.len(), 2);
        f.source_subnets = s(&["10.0.0.0/8", "10.0.0.0/40"]);
        assert_eq!(
            Flow::parse(&f),
            Err(FlowError::BadCidr {
                flow: "f".into(),
                value: "10.0.0.0/40".into(),
                reason: "IPv4 prefix length above 32"
            })
        );
    }

    #[test]
    fn vip_addresses() {
        let v = |a: &str| {
            Vip::parse(&VipSpec {
                name: "v".into(),
                address: a.into(),
            })
        };
        let host = v("20.0.0.1").unwrap();
        assert_eq!((host.prefix.len, host.v6), (128, false));
        assert_eq!(&host.prefix.octets()[10..], &[0xff, 0xff, 20, 0, 0, 1]);
        assert_eq!(v("20.0.0.0/24").unwrap().prefix.len, 120);
        let h6 = v("2001:db8::1").unwrap();
        assert_eq!((h6.prefix.len, h6.v6), (128, true));
        assert_eq!(v("2001:db8::/64").unwrap().prefix.len, 64);
        assert!(matches!(
            v("20.0.0.256"),
            Err(FlowError::BadVipAddress { .. })
        ));
        assert!(matches!(
            v("20.0.0.0/33"),
            Err(FlowError::BadVipAddress { .. })
        ));
        assert!(matches!(v(""), Err(FlowError::BadVipAddress { .. })));
        // IPv6 VIPs holding IPv4-mapped addresses would take IPv4 traffic.
        let mapped = "an IPv6 VIP may not hold IPv4-mapped addresses (::ffff:0:0/96)";
        for a in ["::ffff:20.0.0.1", "::ffff:0:0/100", "::/64", "::/1"] {
            assert!(
                matches!(v(a), Err(FlowError::BadVipAddress { reason, .. }) if reason == mapped),
                "{a}"
            );
        }
        assert!(v("::1").is_ok() && v("::1:0:0:0/96").is_ok());
    }

    #[test]
    fn byte_matches_good() {
        let bm = |s: &str| ByteMatch::parse(s).unwrap();
        let m = bm("tcp[2:2] = 5001");
        assert_eq!(
            m,
            ByteMatch {
                protocol: Protocol::Tcp,
                offset: 2,
                nbytes: 2,
                mask: 0xffff,
                value: 5001
            }
        );
        let m = bm("tcp[0:4] & 0x0000ffff = 5001");
        assert_eq!((m.offset, m.nbytes, m.mask, m.value), (0, 4, 0xffff, 5001));
        let m = bm("udp[10 :  1]&0xf0=0x20");
        assert_eq!(
            (m.protocol, m.offset, m.nbytes, m.mask, m.value),
            (Protocol::Udp, 10, 1, 0xf0, 0x20)
        );
        let m = bm("sctp[0:4]=0xffffffff");
        assert_eq!(
            (m.protocol, m.mask, m.value),
            (Protocol::Sctp, u32::MAX, u32::MAX)
        );
        // The last offset the kernel reads.
        assert_eq!(bm("tcp[511:1] = 255").offset, 511);
        assert_eq!(bm("udp[1:2]   &   0xff00   =   0").mask, 0xff00);
    }

    #[test]
    fn byte_matches_bad() {
        for (bad, reason) in [
            ("tcp[2:2] = 70000", "value 70000 does not fit in 2 bytes"),
            ("tcp[0:1] = 256", "value 256 does not fit in 1 bytes"),
            ("tcp[0:1] & 0x100 = 1", "mask 0x100 does not fit in 1 bytes"),
            (
                "tcp[0:4] = 4294967296",
                "value 4294967296 does not fit in 4 bytes",
            ),
            (
                "tcp[0:4] = 99999999999999999999999",
                "value 99999999999999999999999 does not fit in 4 bytes",
            ),
            (
                "tcp[0:2] = 0x10000",
                "value 0x10000 does not fit in 2 bytes",
            ),
            ("icmp[0:1] = 8", "must start with tcp, udp or sctp"),
            ("tcp[0:3] = 1", "size must be 1, 2 or 4"),
            (
                "tcp[70000:1] = 1",
                "offset 70000 too large (the L4 header is read up to 512 bytes)",
            ),
            (
                "udp[512:1] = 1",
                "offset 512 too large (the L4 header is read up to 512 bytes)",
            ),
            ("tcp [0:1] = 1", "expected \"[\""),
            ("tcp[ 0:1] = 1", "missing offset"),
            ("tcp[0:1 ] = 1", "expected \"]\""),
            ("tcp[0:1] & 0xFF = 1", "mask needs hex digits 0-9a-f"),
            ("tcp[0:1] & 255 = 1", "expected \"0x\""),
            ("tcp[0:1] = 0x", "value needs hex digits 0-9a-f"),
            ("tcp[0:1] = 0xA", "value needs hex digits 0-9a-f"),
            ("tcp[0:1] = 1 ", "unexpected text after the value"),
            (" tcp[0:1] = 1", "must start with tcp, udp or sctp"),
            ("tcp[0:1] = -1", "missing value"),
            ("tcp[0:1] == 1", "missing value"),
            ("tcp[0:1]", "expected \"=\""),
        ] {
            assert_eq!(ByteMatch::parse(bad), Err(reason.to_string()), "{bad:?}");
        }
        // Found by a tester: a match on a protocol the flow does not take
        // (or beside one on another protocol) was accepted and never matched.
        for (protocols, matches, reason) in [
            (
                &["udp"][..],
                &["tcp[2:2] = 1"][..],
                "the flow's protocols do not include tcp",
            ),
            (
                &[],
                &["udp[0:1] = 1", "tcp[0:1] = 1"],
                "the flow's other byte matches are on udp packets; a packet is one or the other",
            ),
        ] {
            let mut f = flow("f");
            f.protocols = s(protocols);
            f.byte_matches = s(matches);
            assert_eq!(
                Flow::parse(&f),
                Err(FlowError::ByteMatchNeverMatches {
                    flow: "f".into(),
                    value: matches[matches.len() - 1].into(),
                    reason: reason.into()
                })
            );
        }
        let mut f = flow("f");
        f.protocols = s(&["tcp", "udp"]);
        f.byte_matches = s(&["udp[0:1] = 1"]);
        assert!(
            Flow::parse(&f).is_ok(),
            "a match narrows the flow to its protocol"
        );
        let mut f = flow("f");
        f.byte_matches = s(&["tcp[2:2] = 5001", "tcp[2:2] = 70000"]);
        assert_eq!(
            Flow::parse(&f),
            Err(FlowError::BadByteMatch {
                flow: "f".into(),
                value: "tcp[2:2] = 70000".into(),
                reason: "value 70000 does not fit in 2 bytes".into()
            })
        );
    }

    #[test]
    fn byte_match_eval() {
        let m = ByteMatch::parse("tcp[1:2] & 0x0ff0 = 0x0340").unwrap();
        assert!(m.matches(ProtoClass::Tcp, &[0, 0x93, 0x4f]));
        assert!(!m.matches(ProtoClass::Tcp, &[0, 0x93, 0x5f]));
        assert!(
            !m.matches(ProtoClass::Udp, &[0, 0x93, 0x4f]),
            "wrong protocol"
        );
        assert!(
            !m.matches(ProtoClass::Tcp, &[0, 0x93]),
            "runs past the slice"
        );
    }

    #[test]
    fn names() {
        let mut f = flow("f");
        f.stream = String::new();
        let err = Flow::parse(&f).unwrap_err();
        assert!(err.to_string().contains("flow \"f\" stream"), "{err}");
        f = flow("bad name");
        assert!(matches!(Flow::parse(&f), Err(FlowError::BadName { .. })));
        assert!(matches!(
            Vip::parse(&VipSpec {
                name: "v/1".into(),
                address: "1.1.1.1".into()
            }),
            Err(FlowError::BadName { .. })
        ));
    }

    #[test]
    fn flow_set_cross_checks() {
        let ok = FlowSet::parse(&vips(), &[flow("a"), flow("b")]).unwrap();
        assert_eq!(ok.flows.len(), 2);
        assert_eq!(ok.flows_of("vip").count(), 2);

        assert_eq!(
            FlowSet::parse(&vips(), &[flow("a"), flow("a")]),
            Err(FlowError::DuplicateFlow { flow: "a".into() })
        );
        let mut f = flow("a");
        f.vips = s(&["vip", "nope"]);
        assert_eq!(
            FlowSet::parse(&vips(), &[f]),
            Err(FlowError::UnknownVip {
                flow: "a".into(),
                vip: "nope".into()
            })
        );
        let two = [vips(), vips()].concat();
        assert_eq!(
            FlowSet::parse(&two, &[]),
            Err(FlowError::DuplicateVip { vip: "vip".into() })
        );

        let many: Vec<_> = (0..65).map(|i| flow(&format!("f{i}"))).collect();
        let err = FlowSet::parse(&vips(), &many).unwrap_err();
        assert_eq!(
            err,
            FlowError::TooManyFlows {
                vip: "vip".into(),
                count: 65
            }
        );
        assert!(
            err.to_string().contains("VIP \"vip\" has 65 flows"),
            "{err}"
        );
        assert!(FlowSet::parse(&vips(), &many[..64]).is_ok());
    }

    #[test]
    fn spec_deserializes_with_defaults() {
        let f: FlowSpec =
            serde_json::from_str(r#"{"name":"f","priority":3,"protocols":["tcp"]}"#).unwrap();
        assert_eq!(
            (f.name.as_str(), f.priority, f.protocols.len(), f.vips.len()),
            ("f", 3, 1, 0)
        );
    }
}
