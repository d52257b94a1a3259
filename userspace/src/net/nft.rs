//! nftables through nf_tables netlink (no `nft` process): a table is
//! written whole in one transaction (a batch the kernel applies entirely or
//! not at all) and read back as chains and expressions.
//!
//! Rules are made of [`Match`]es and one [`Action`]; each compiles to the
//! expressions the `nft` tool would generate for the same text, so `nft list`
//! shows them as written in [`Table`]'s `Display`. A new kind of rule is a
//! new variant here and its expressions in [`Match::exprs`] or [`Action::exprs`].

use std::fmt;
use std::net::Ipv4Addr;

use super::socket::{Netlink, NETLINK_NETFILTER};
use super::NetError;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_GETRULE: u16 = 7;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLA_F_NESTED: u16 = 0x8000;

const NFPROTO_IPV4: u8 = 2;

const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;

const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;
/// `immediate` into the verdict register: `NFTA_DATA_VERDICT` holding
/// `NFTA_VERDICT_CODE`.
const REG_VERDICT: u32 = 0;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
/// The 16-byte registers.
const REG_1: u32 = 1;
const REG_2: u32 = 2;
/// `RTN_LOCAL`, what `fib daddr type` gives for this node's addresses.
const RTN_LOCAL: u32 = 2;

/// A netfilter hook of the inet families.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Prerouting = 0,
    Input = 1,
    Forward = 2,
    Output = 3,
    Postrouting = 4,
}

impl Hook {
    fn name(self) -> &'static str {
        match self {
            Hook::Prerouting => "prerouting",
            Hook::Input => "input",
            Hook::Forward => "forward",
            Hook::Output => "output",
            Hook::Postrouting => "postrouting",
        }
    }
}

/// An IPv4 table (`table ip NAME`) of base chains.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Table {
    pub name: String,
    pub chains: Vec<Chain>,
}

/// A base chain of type `nat`, policy accept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    pub name: String,
    pub hook: Hook,
    pub priority: i32,
    pub rules: Vec<Rule>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub matches: Vec<Match>,
    pub action: Action,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp = 6,
    Udp = 17,
}

impl L4 {
    fn name(self) -> &'static str {
        match self {
            L4::Tcp => "tcp",
            L4::Udp => "udp",
        }
    }
}

/// What a rule matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Match {
    /// `fib daddr type local`: addressed to this node.
    DestinationLocal,
    /// `tcp dport N` / `udp dport N`.
    DestinationPort(L4, u16),
    /// `ip saddr ADDR/LEN`.
    SourceIn(Ipv4Addr, u8),
    /// `ip daddr != ADDR/LEN`.
    DestinationNotIn(Ipv4Addr, u8),
    /// `iif INDEX`: came in on that interface.
    InputInterface(u32),
    /// `oif INDEX`: goes out of that interface.
    OutputInterface(u32),
}

/// What a rule does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// `dnat to ADDR:PORT`.
    Dnat(Ipv4Addr, u16),
    /// `masquerade`: the source becomes the output interface's address.
    Masquerade,
    /// `snat to ADDR`.
    Snat(Ipv4Addr),
    /// `dnat to ADDR` (ports kept).
    DnatAddress(Ipv4Addr),
    /// `drop`.
    Drop,
}

/// One nf_tables expression, as written to and read from the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expr {
    /// `fib <flags> <result> => reg`.
    Fib { flags: u32, result: u32, dreg: u32 },
    /// `meta load <key> => reg`.
    Meta { key: u32, dreg: u32 },
    /// `payload load <len>b @ <base> + <offset> => reg`.
    Payload {
        base: u32,
        offset: u32,
        len: u32,
        dreg: u32,
    },
    /// `cmp <op> reg <data>`.
    Cmp { sreg: u32, op: u32, data: Vec<u8> },
    /// `bitwise reg = (reg & mask) ^ xor` over `len` bytes.
    Bitwise {
        sreg: u32,
        dreg: u32,
        len: u32,
        mask: Vec<u8>,
        xor: Vec<u8>,
    },
    /// `masq`, with the kernel's attributes (none unless flags are set).
    Masq { attributes: Vec<(u16, u32)> },
    /// `immediate reg <data>`.
    Immediate { dreg: u32, data: Vec<u8> },
    /// `immediate reg 0 <verdict>` (`NF_DROP` 0, `NF_ACCEPT` 1).
    Verdict { code: u32 },
    /// `nat <type> <family> addr_min reg proto_min reg`, attributes as the
    /// kernel keeps them (it adds the max registers and flags).
    Nat { attributes: Vec<(u16, u32)> },
    /// Anything else, by name.
    Other { name: String },
}

impl Match {
    fn exprs(self) -> Vec<Expr> {
        match self {
            Match::DestinationLocal => vec![
                Expr::Fib {
                    flags: 1 << 1, // NFTA_FIB_F_DADDR
                    result: 3,     // NFT_FIB_RESULT_ADDRTYPE
                    dreg: REG_1,
                },
                Expr::Cmp {
                    sreg: REG_1,
                    op: 0,
                    data: RTN_LOCAL.to_ne_bytes().to_vec(),
                },
            ],
            Match::DestinationPort(l4, port) => vec![
                Expr::Meta {
                    key: 16, // NFT_META_L4PROTO
                    dreg: REG_1,
                },
                Expr::Cmp {
                    sreg: REG_1,
                    op: 0,
                    data: vec![l4 as u8],
                },
                Expr::Payload {
                    base: 2, // transport header
                    offset: 2,
                    len: 2,
                    dreg: REG_1,
                },
                Expr::Cmp {
                    sreg: REG_1,
                    op: 0,
                    data: port.to_be_bytes().to_vec(),
                },
            ],
            Match::SourceIn(addr, len) => prefix_exprs(12, addr, len, CMP_EQ),
            Match::InputInterface(index) => interface_exprs(4, index),
            Match::OutputInterface(index) => interface_exprs(5, index),
            Match::DestinationNotIn(addr, len) => prefix_exprs(16, addr, len, CMP_NEQ),
        }
    }
}

/// `meta iif`/`oif` (keys 4 and 5) compared with an interface index.
fn interface_exprs(key: u32, index: u32) -> Vec<Expr> {
    vec![
        Expr::Meta { key, dreg: REG_1 },
        Expr::Cmp {
            sreg: REG_1,
            op: CMP_EQ,
            data: index.to_ne_bytes().to_vec(),
        },
    ]
}

const CMP_EQ: u32 = 0;
const CMP_NEQ: u32 = 1;

/// The IPv4 address at `offset` of the network header compared with a
/// prefix, as nft writes it (no bitwise for a /32).
fn prefix_exprs(offset: u32, addr: Ipv4Addr, len: u8, op: u32) -> Vec<Expr> {
    let len = len.min(32);
    let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
    let network = u32::from(addr) & mask;
    let mut out = vec![Expr::Payload {
        base: 1, // network header
        offset,
        len: 4,
        dreg: REG_1,
    }];
    if len < 32 {
        out.push(Expr::Bitwise {
            sreg: REG_1,
            dreg: REG_1,
            len: 4,
            mask: mask.to_be_bytes().to_vec(),
            xor: vec![0; 4],
        });
    }
    out.push(Expr::Cmp {
        sreg: REG_1,
        op,
        data: network.to_be_bytes().to_vec(),
    });
    out
}

impl Action {
    fn exprs(self) -> Vec<Expr> {
        match self {
            Action::Dnat(addr, port) => vec![
                Expr::Immediate {
                    dreg: REG_1,
                    data: addr.octets().to_vec(),
                },
                Expr::Immediate {
                    dreg: REG_2,
                    data: port.to_be_bytes().to_vec(),
                },
                Expr::Nat {
                    attributes: vec![
                        (1, 1),                       // NFTA_NAT_TYPE: DNAT
                        (2, u32::from(NFPROTO_IPV4)), // NFTA_NAT_FAMILY
                        (3, REG_1),                   // NFTA_NAT_REG_ADDR_MIN
                        (5, REG_2),                   // NFTA_NAT_REG_PROTO_MIN
                    ],
                },
            ],
            Action::Masquerade => vec![Expr::Masq {
                attributes: Vec::new(),
            }],
            Action::Drop => vec![Expr::Verdict { code: NF_DROP }],
            Action::Snat(addr) | Action::DnatAddress(addr) => vec![
                Expr::Immediate {
                    dreg: REG_1,
                    data: addr.octets().to_vec(),
                },
                Expr::Nat {
                    attributes: vec![
                        (1, u32::from(matches!(self, Action::DnatAddress(_)))), // SNAT 0, DNAT 1
                        (2, u32::from(NFPROTO_IPV4)),
                        (3, REG_1),
                    ],
                },
            ],
        }
    }
}

impl Rule {
    pub fn exprs(&self) -> Vec<Expr> {
        let mut out: Vec<Expr> = self.matches.iter().flat_map(|m| m.exprs()).collect();
        out.extend(self.action.exprs());
        out
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for m in &self.matches {
            match m {
                Match::DestinationLocal => write!(f, "fib daddr type local ")?,
                Match::DestinationPort(l4, port) => write!(f, "{} dport {port} ", l4.name())?,
                Match::SourceIn(addr, len) => write!(f, "ip saddr {addr}/{len} ")?,
                Match::DestinationNotIn(addr, len) => write!(f, "ip daddr != {addr}/{len} ")?,
                Match::InputInterface(index) => write!(f, "iif {index} ")?,
                Match::OutputInterface(index) => write!(f, "oif {index} ")?,
            }
        }
        match self.action {
            Action::Dnat(addr, port) => write!(f, "dnat to {addr}:{port}"),
            Action::Masquerade => write!(f, "masquerade"),
            Action::Snat(addr) => write!(f, "snat to {addr}"),
            Action::DnatAddress(addr) => write!(f, "dnat to {addr}"),
            Action::Drop => write!(f, "drop"),
        }
    }
}

impl fmt::Display for Table {
    /// The transaction as an `nft -f` script: the table is created if
    /// missing, deleted, and written again when it has chains.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = &self.name;
        writeln!(f, "table ip {name}\ndelete table ip {name}")?;
        if self.chains.is_empty() {
            return Ok(());
        }
        writeln!(f, "table ip {name} {{")?;
        for chain in &self.chains {
            writeln!(f, "  chain {} {{", chain.name)?;
            writeln!(
                f,
                "    type nat hook {} priority {}; policy accept;",
                chain.hook.name(),
                match (chain.hook, chain.priority) {
                    (Hook::Prerouting, -100) => "dstnat".to_string(),
                    (Hook::Postrouting, 100) => "srcnat".to_string(),
                    (_, p) => p.to_string(),
                }
            )?;
            for rule in &chain.rules {
                writeln!(f, "    {rule}")?;
            }
            writeln!(f, "  }}")?;
        }
        writeln!(f, "}}")
    }
}

/// Netlink attributes as bytes.
#[derive(Default)]
struct Attrs(Vec<u8>);

impl Attrs {
    fn put(&mut self, kind: u16, value: &[u8]) -> &mut Self {
        let length = 4 + value.len();
        self.0.extend_from_slice(&(length as u16).to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(value);
        self.0.resize(self.0.len() + ((4 - length % 4) % 4), 0);
        self
    }

    fn string(&mut self, kind: u16, value: &str) -> &mut Self {
        let mut bytes = value.as_bytes().to_vec();
        bytes.push(0);
        self.put(kind, &bytes)
    }

    fn be32(&mut self, kind: u16, value: u32) -> &mut Self {
        self.put(kind, &value.to_be_bytes())
    }

    fn nested(&mut self, kind: u16, inner: &Attrs) -> &mut Self {
        self.put(kind | NLA_F_NESTED, &inner.0)
    }
}

fn expr_attrs(expr: &Expr) -> (&str, Attrs) {
    let mut a = Attrs::default();
    let data = |bytes: &[u8]| {
        let mut d = Attrs::default();
        d.put(NFTA_DATA_VALUE, bytes);
        d
    };
    let name = match expr {
        Expr::Fib {
            flags,
            result,
            dreg,
        } => {
            a.be32(1, *dreg).be32(2, *result).be32(3, *flags);
            "fib"
        }
        Expr::Meta { key, dreg } => {
            a.be32(1, *dreg).be32(2, *key);
            "meta"
        }
        Expr::Payload {
            base,
            offset,
            len,
            dreg,
        } => {
            a.be32(1, *dreg)
                .be32(2, *base)
                .be32(3, *offset)
                .be32(4, *len);
            "payload"
        }
        Expr::Cmp { sreg, op, data: d } => {
            a.be32(1, *sreg).be32(2, *op).nested(3, &data(d));
            "cmp"
        }
        Expr::Immediate { dreg, data: d } => {
            a.be32(1, *dreg).nested(2, &data(d));
            "immediate"
        }
        Expr::Verdict { code } => {
            let mut verdict = Attrs::default();
            verdict.be32(NFTA_VERDICT_CODE, *code);
            let mut d = Attrs::default();
            d.nested(NFTA_DATA_VERDICT, &verdict);
            a.be32(1, REG_VERDICT).nested(2, &d);
            "immediate"
        }
        Expr::Bitwise {
            sreg,
            dreg,
            len,
            mask,
            xor,
        } => {
            a.be32(1, *sreg)
                .be32(2, *dreg)
                .be32(3, *len)
                .nested(4, &data(mask))
                .nested(5, &data(xor));
            "bitwise"
        }
        Expr::Nat { attributes } => {
            for (kind, value) in attributes {
                a.be32(*kind, *value);
            }
            "nat"
        }
        Expr::Masq { attributes } => {
            for (kind, value) in attributes {
                a.be32(*kind, *value);
            }
            "masq"
        }
        Expr::Other { name } => name,
    };
    (name, a)
}

/// One nf_tables message: header, `nfgenmsg`, attributes.
fn message(
    kind: u16,
    flags: u16,
    sequence: u32,
    family: u8,
    res_id: u16,
    attrs: &Attrs,
) -> Vec<u8> {
    let length = 16 + 4 + attrs.0.len();
    let mut m = Vec::with_capacity(length);
    m.extend_from_slice(&(length as u32).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&sequence.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[family, 0]);
    m.extend_from_slice(&res_id.to_be_bytes());
    m.extend_from_slice(&attrs.0);
    m
}

fn nft_kind(msg: u16) -> u16 {
    (NFNL_SUBSYS_NFTABLES << 8) | msg
}

/// What one message of a batch does, for error messages.
struct Step {
    sequence: u32,
    what: String,
    bytes: Vec<u8>,
}

/// Makes the kernel hold `table` exactly as given, in one transaction: it is
/// created if missing, deleted, and (when it has chains) written again. A
/// table without chains is thereby removed.
pub fn write(table: &Table) -> Result<(), NetError> {
    let mut socket = Netlink::open(NETLINK_NETFILTER)
        .map_err(NetError::kernel("opening an nf_tables netlink socket"))?;
    let begin_sequence = socket.next_sequence();
    let mut steps = Vec::new();
    let mut step = |socket: &mut Netlink, msg: u16, flags: u16, what: String, attrs: Attrs| {
        let sequence = socket.next_sequence();
        let bytes = message(
            nft_kind(msg),
            NLM_F_REQUEST | NLM_F_ACK | flags,
            sequence,
            NFPROTO_IPV4,
            0,
            &attrs,
        );
        steps.push(Step {
            sequence,
            what,
            bytes,
        });
    };
    let table_attrs = || {
        let mut a = Attrs::default();
        a.string(NFTA_TABLE_NAME, &table.name);
        a
    };
    let name = &table.name;
    step(
        &mut socket,
        NFT_MSG_NEWTABLE,
        NLM_F_CREATE,
        format!("creating table ip {name}"),
        table_attrs(),
    );
    step(
        &mut socket,
        NFT_MSG_DELTABLE,
        0,
        format!("deleting table ip {name}"),
        table_attrs(),
    );
    if !table.chains.is_empty() {
        step(
            &mut socket,
            NFT_MSG_NEWTABLE,
            NLM_F_CREATE,
            format!("creating table ip {name}"),
            table_attrs(),
        );
    }
    for chain in &table.chains {
        let mut hook = Attrs::default();
        hook.be32(NFTA_HOOK_HOOKNUM, chain.hook as u32)
            .be32(NFTA_HOOK_PRIORITY, chain.priority as u32);
        let mut a = Attrs::default();
        a.string(NFTA_CHAIN_TABLE, name)
            .string(NFTA_CHAIN_NAME, &chain.name)
            .nested(NFTA_CHAIN_HOOK, &hook)
            .be32(NFTA_CHAIN_POLICY, NF_ACCEPT)
            .string(NFTA_CHAIN_TYPE, "nat");
        step(
            &mut socket,
            NFT_MSG_NEWCHAIN,
            NLM_F_CREATE,
            format!("creating chain {}", chain.name),
            a,
        );
        for rule in &chain.rules {
            let mut list = Attrs::default();
            for expr in rule.exprs() {
                let (expr_name, data) = expr_attrs(&expr);
                let mut e = Attrs::default();
                e.string(NFTA_EXPR_NAME, expr_name)
                    .nested(NFTA_EXPR_DATA, &data);
                list.nested(NFTA_LIST_ELEM, &e);
            }
            let mut a = Attrs::default();
            a.string(NFTA_RULE_TABLE, name)
                .string(NFTA_RULE_CHAIN, &chain.name)
                .nested(NFTA_RULE_EXPRESSIONS, &list);
            let what = format!("adding `{rule}` to chain {}", chain.name);
            step(
                &mut socket,
                NFT_MSG_NEWRULE,
                NLM_F_CREATE | NLM_F_APPEND,
                what,
                a,
            );
        }
    }
    let end_sequence = socket.next_sequence();
    let subsystem = NFNL_SUBSYS_NFTABLES;
    let mut batch = message(
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        begin_sequence,
        0,
        subsystem,
        &Attrs::default(),
    );
    for s in &steps {
        batch.extend_from_slice(&s.bytes);
    }
    batch.extend(message(
        NFNL_MSG_BATCH_END,
        NLM_F_REQUEST,
        end_sequence,
        0,
        subsystem,
        &Attrs::default(),
    ));
    let first = steps.first().map(|s| s.sequence).unwrap_or(begin_sequence);
    let last = steps.last().map(|s| s.sequence).unwrap_or(begin_sequence);
    socket
        .exchange(&batch, begin_sequence, first..=last, false, |_, _| {})
        .map_err(|refused| {
            let what = steps
                .iter()
                .find(|s| s.sequence == refused.sequence)
                .map(|s| s.what.clone())
                .unwrap_or_else(|| format!("writing table ip {name}"));
            NetError::Kernel {
                op: format!("nftables refused {what}"),
                source: refused.error,
            }
        })
}

/// Attributes of a message part: (kind without flags, value).
fn attributes(mut bytes: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while bytes.len() >= 4 {
        let length = usize::from(u16::from_ne_bytes([bytes[0], bytes[1]]));
        let kind = u16::from_ne_bytes([bytes[2], bytes[3]]) & 0x3fff;
        if length < 4 || length > bytes.len() {
            break;
        }
        out.push((kind, &bytes[4..length]));
        bytes = bytes.get((length + 3) & !3..).unwrap_or_default();
    }
    out
}

fn find(attrs: &[(u16, &[u8])], kind: u16) -> Option<Vec<u8>> {
    attrs
        .iter()
        .find(|(k, _)| *k == kind)
        .map(|(_, v)| v.to_vec())
}

fn be32(value: &[u8]) -> u32 {
    value
        .get(..4)
        .map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")))
        .unwrap_or(0)
}

fn text(value: &[u8]) -> String {
    String::from_utf8_lossy(value.split(|b| *b == 0).next().unwrap_or_default()).into_owned()
}

fn decode_expr(bytes: &[u8]) -> Expr {
    let attrs = attributes(bytes);
    let name = find(&attrs, NFTA_EXPR_NAME)
        .map(|v| text(&v))
        .unwrap_or_default();
    let data_bytes = find(&attrs, NFTA_EXPR_DATA).unwrap_or_default();
    let data = attributes(&data_bytes);
    let u = |kind| find(&data, kind).map(|v| be32(&v)).unwrap_or(0);
    let value = |kind| {
        find(&data, kind)
            .map(|v| find(&attributes(&v), NFTA_DATA_VALUE).unwrap_or_default())
            .unwrap_or_default()
    };
    match name.as_str() {
        "fib" => Expr::Fib {
            dreg: u(1),
            result: u(2),
            flags: u(3),
        },
        "meta" => Expr::Meta {
            dreg: u(1),
            key: u(2),
        },
        "payload" => Expr::Payload {
            dreg: u(1),
            base: u(2),
            offset: u(3),
            len: u(4),
        },
        "cmp" => Expr::Cmp {
            sreg: u(1),
            op: u(2),
            data: value(3),
        },
        "immediate" if u(1) == REG_VERDICT => Expr::Verdict {
            code: find(&data, 2)
                .and_then(|d| find(&attributes(&d), NFTA_DATA_VERDICT))
                .and_then(|v| find(&attributes(&v), NFTA_VERDICT_CODE))
                .map(|c| be32(&c))
                .unwrap_or(u32::MAX),
        },
        "immediate" => Expr::Immediate {
            dreg: u(1),
            data: value(2),
        },
        // The kernel also reports the operation (6, boolean): left out.
        "bitwise" => Expr::Bitwise {
            sreg: u(1),
            dreg: u(2),
            len: u(3),
            mask: value(4),
            xor: value(5),
        },
        "nat" => Expr::Nat {
            attributes: data.iter().map(|(k, v)| (*k, be32(v))).collect(),
        },
        "masq" => Expr::Masq {
            attributes: data.iter().map(|(k, v)| (*k, be32(v))).collect(),
        },
        _ => Expr::Other { name },
    }
}

/// A dump of one nf_tables object kind of table `table`, each answer's attributes.
fn dump(msg: u16, table: &str, table_attr: u16) -> Result<Vec<Vec<u8>>, NetError> {
    let mut socket = Netlink::open(NETLINK_NETFILTER)
        .map_err(NetError::kernel("opening an nf_tables netlink socket"))?;
    let sequence = socket.next_sequence();
    let mut attrs = Attrs::default();
    attrs.string(table_attr, table);
    let request = message(
        nft_kind(msg),
        NLM_F_REQUEST | NLM_F_DUMP,
        sequence,
        NFPROTO_IPV4,
        0,
        &attrs,
    );
    let mut found = Vec::new();
    socket
        .exchange(&request, sequence, sequence..=sequence, true, |_, whole| {
            // After the netlink header and nfgenmsg.
            if let Some(attrs) = whole.get(20..) {
                found.push(attrs.to_vec());
            }
        })
        .map_err(|r| NetError::kernel(format!("reading table ip {table}"))(r.error))?;
    Ok(found)
}

/// A chain as the kernel holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelChain {
    pub name: String,
    pub hook: Option<u32>,
    pub priority: Option<i32>,
    pub kind: String,
    pub policy: Option<u32>,
    /// Each rule's expressions, in order.
    pub rules: Vec<Vec<Expr>>,
}

/// Reads table `ip NAME` back: its chains with their rules; `None` when the
/// table does not exist.
pub fn read(name: &str) -> Result<Option<Vec<KernelChain>>, NetError> {
    let mut socket = Netlink::open(NETLINK_NETFILTER)
        .map_err(NetError::kernel("opening an nf_tables netlink socket"))?;
    let sequence = socket.next_sequence();
    let mut attrs = Attrs::default();
    attrs.string(NFTA_TABLE_NAME, name);
    let request = message(
        nft_kind(NFT_MSG_GETTABLE),
        NLM_F_REQUEST | NLM_F_ACK,
        sequence,
        NFPROTO_IPV4,
        0,
        &attrs,
    );
    match socket.exchange(&request, sequence, sequence..=sequence, false, |_, _| {}) {
        Ok(()) => {}
        Err(r) if super::socket::errno_of(&r.error) == Some(libc::ENOENT) => return Ok(None),
        Err(r) => {
            return Err(NetError::kernel(format!("reading table ip {name}"))(
                r.error,
            ))
        }
    }
    let mut chains: Vec<KernelChain> = dump(NFT_MSG_GETCHAIN, name, NFTA_CHAIN_TABLE)?
        .iter()
        .map(|bytes| {
            let attrs = attributes(bytes);
            let hook = find(&attrs, NFTA_CHAIN_HOOK).map(|h| {
                let h = attributes(&h)
                    .iter()
                    .map(|(k, v)| (*k, v.to_vec()))
                    .collect::<Vec<_>>();
                let get = |kind| h.iter().find(|(k, _)| *k == kind).map(|(_, v)| be32(v));
                (
                    get(NFTA_HOOK_HOOKNUM),
                    get(NFTA_HOOK_PRIORITY).map(|p| p as i32),
                )
            });
            KernelChain {
                name: find(&attrs, NFTA_CHAIN_NAME)
                    .map(|v| text(&v))
                    .unwrap_or_default(),
                hook: hook.and_then(|h| h.0),
                priority: hook.and_then(|h| h.1),
                kind: find(&attrs, NFTA_CHAIN_TYPE)
                    .map(|v| text(&v))
                    .unwrap_or_default(),
                policy: find(&attrs, NFTA_CHAIN_POLICY).map(|v| be32(&v)),
                rules: Vec::new(),
            }
        })
        .collect();
    for bytes in dump(NFT_MSG_GETRULE, name, NFTA_RULE_TABLE)? {
        let attrs = attributes(&bytes);
        let chain = find(&attrs, NFTA_RULE_CHAIN)
            .map(|v| text(&v))
            .unwrap_or_default();
        let exprs = find(&attrs, NFTA_RULE_EXPRESSIONS)
            .map(|list| {
                attributes(&list)
                    .iter()
                    .filter(|(k, _)| *k == NFTA_LIST_ELEM)
                    .map(|(_, e)| decode_expr(e))
                    .collect()
            })
            .unwrap_or_default();
        if let Some(c) = chains.iter_mut().find(|c| c.name == chain) {
            c.rules.push(exprs);
        }
    }
    Ok(Some(chains))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expressions_round_trip_through_the_encoding() {
        let rule = Rule {
            matches: vec![
                Match::DestinationLocal,
                Match::DestinationPort(L4::Udp, 8080),
            ],
            action: Action::Dnat(Ipv4Addr::new(192, 0, 2, 2), 80),
        };
        assert_eq!(
            rule.to_string(),
            "fib daddr type local udp dport 8080 dnat to 192.0.2.2:80"
        );
        let masq = Rule {
            matches: vec![
                Match::SourceIn(Ipv4Addr::new(192, 0, 2, 64), 26),
                Match::DestinationNotIn(Ipv4Addr::new(192, 0, 2, 64), 26),
            ],
            action: Action::Masquerade,
        };
        assert_eq!(
            masq.to_string(),
            "ip saddr 192.0.2.64/26 ip daddr != 192.0.2.64/26 masquerade"
        );
        // As nft writes `ip saddr 192.0.2.64/26`: load, mask, compare.
        assert_eq!(
            masq.exprs()[..3],
            [
                Expr::Payload {
                    base: 1,
                    offset: 12,
                    len: 4,
                    dreg: 1
                },
                Expr::Bitwise {
                    sreg: 1,
                    dreg: 1,
                    len: 4,
                    mask: vec![255, 255, 255, 192],
                    xor: vec![0; 4]
                },
                Expr::Cmp {
                    sreg: 1,
                    op: 0,
                    data: vec![192, 0, 2, 64]
                },
            ]
        );
        assert_eq!(
            Rule {
                matches: vec![Match::SourceIn(Ipv4Addr::new(192, 0, 2, 7), 32)],
                action: Action::Masquerade
            }
            .exprs()
            .len(),
            3,
            "no bitwise for a /32"
        );
        let drop = Rule {
            matches: vec![Match::DestinationPort(L4::Udp, 50103)],
            action: Action::Drop,
        };
        assert_eq!(drop.to_string(), "udp dport 50103 drop");
        assert_eq!(drop.exprs().last(), Some(&Expr::Verdict { code: NF_DROP }));
        for expr in rule
            .exprs()
            .into_iter()
            .chain(masq.exprs())
            .chain(drop.exprs())
        {
            let (name, data) = expr_attrs(&expr);
            let mut e = Attrs::default();
            e.string(NFTA_EXPR_NAME, name).nested(NFTA_EXPR_DATA, &data);
            assert_eq!(decode_expr(&e.0), expr);
        }
    }
}
