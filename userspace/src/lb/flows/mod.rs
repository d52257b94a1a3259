//! Meridio flows: parsing, validation and compilation into O(1) classification tables.
//!
//! [`spec`] parses and validates nsp.v1-style flows and VIPs into a [`FlowSet`];
//! [`compile`] turns each VIP's flows into lookup tables ([`CompiledVip`]) whose
//! [`CompiledVip::classify`] is the reference the XDP classifier mirrors.

pub mod compile;
pub mod spec;

pub use compile::{
    compile, compile_vip, CompiledFlow, CompiledVip, PacketView, PortInterval, PortPrefix,
    PortTable, SourceEntry, SourceTable,
};
pub use spec::{
    ByteMatch, Flow, FlowError, FlowSet, FlowSpec, PortRange, ProtoClass, Protocol, Vip, VipSpec,
    MAX_FLOWS_PER_VIP,
};
