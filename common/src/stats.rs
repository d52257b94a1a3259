//! Per-CPU statistics kept by every program: verdicts, drop reasons, protocols.
//!
//! One `tm_stats` entry per program slot holds all three, so a packet costs one
//! map lookup however many counters it touches.

/// Defines a struct of named `u64` counters and an enum indexing them.
///
/// The struct is what `bpftool map dump` prints with field names; the enum is
/// what the kernel side uses to pick a field.
macro_rules! counter_set {
    ($(#[$meta:meta])* $st:ident, $en:ident { $($field:ident => $variant:ident),* $(,)? }) => {
        $(#[$meta])*
        #[repr(C)]
        #[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
        pub struct $st { $(pub $field: u64,)* }

        #[repr(u32)]
        #[derive(Copy, Clone, Debug, PartialEq, Eq)]
        pub enum $en { $($variant,)* }

        impl $en {
            pub const ALL: &'static [$en] = &[$($en::$variant),*];
            pub const COUNT: usize = Self::ALL.len();

            /// The counter's field name, as bpftool prints it.
            pub const fn name(self) -> &'static str {
                match self { $($en::$variant => stringify!($field)),* }
            }
        }

        impl $st {
            pub const fn get(&self, which: $en) -> u64 {
                match which { $($en::$variant => self.$field),* }
            }

            /// Adds `n` to one counter; the index is bounded so the verifier accepts it.
            #[inline(always)]
            pub fn add(&mut self, which: $en, n: u64) {
                let index = which as usize;
                if index < $en::COUNT {
                    // SAFETY: the struct is `repr(C)` and made only of `u64`s (asserted below).
                    unsafe { *(self as *mut Self as *mut u64).add(index) += n };
                }
            }

            /// Like `add`, for a value the verifier knows nothing of (a
            /// subprogram's result): the index is read through a volatile
            /// local, or LLVM would drop the check, knowing the enum's range.
            #[inline(always)]
            pub fn add_unknown(&mut self, which: $en, n: u64) {
                self.add_index(which as u32, n)
            }

            /// Like `add_unknown`, for a reason carried as its index (a
            /// subprogram's scalar result); an index out of range counts nothing.
            #[inline(always)]
            pub fn add_index(&mut self, index: u32, n: u64) {
                let index = index as usize;
                // SAFETY: a read of a local.
                let index = unsafe { core::ptr::read_volatile(&index) };
                if index < $en::COUNT {
                    // SAFETY: the struct is `repr(C)` and made only of `u64`s (asserted below).
                    unsafe { *(self as *mut Self as *mut u64).add(index) += n };
                }
            }

            /// Sums another set into this one (per-CPU values into a total).
            pub fn merge(&mut self, other: &Self) {
                $(self.$field += other.$field;)*
            }
        }

        const _: () = assert!(core::mem::size_of::<$st>() == 8 * $en::COUNT);
    };
}

counter_set!(
    /// Why a packet was dropped: one counter per error the programs can return.
    DropCounters, DropReason {
        truncated_ethernet => TruncatedEthernet,
        truncated_vlan => TruncatedVlan,
        truncated_ipv4 => TruncatedIpv4,
        bad_ipv4_version => BadIpv4Version,
        bad_ipv4_header_length => BadIpv4HeaderLength,
        bad_ipv4_total_length => BadIpv4TotalLength,
        truncated_ipv6 => TruncatedIpv6,
        bad_ipv6_version => BadIpv6Version,
        truncated_ipv6_extension => TruncatedIpv6Extension,
        too_many_ipv6_extensions => TooManyIpv6Extensions,
        truncated_tcp => TruncatedTcp,
        bad_tcp_header_length => BadTcpHeaderLength,
        truncated_udp => TruncatedUdp,
        bad_udp_length => BadUdpLength,
        truncated_sctp => TruncatedSctp,
        truncated_icmp => TruncatedIcmp,
        pull_failed => PullFailed,
        no_flow_match => NoFlowMatch,
        too_many_candidates => TooManyCandidates,
        no_target => NoTarget,
        target_not_local => TargetNotLocal,
        fib_lookup_failed => FibLookupFailed,
        no_neighbour => NoNeighbour,
        adjust_head_failed => AdjustHeadFailed,
        bad_tunnel_packet => BadTunnelPacket,
        unknown_service => UnknownService,
        no_instance => NoInstance,
        sender_not_deployed => SenderNotDeployed,
        too_big_for_tunnel => TooBigForTunnel,
        unsupported_service_packet => UnsupportedServicePacket,
        adjust_room_failed => AdjustRoomFailed,
        tunnel_unknown_node => TunnelUnknownNode,
        redirect_failed => RedirectFailed,
        port_nat_failed => PortNatFailed,
        tunnel_foreign_source => TunnelForeignSource,
        service_source_outside_tunnel => ServiceSourceOutsideTunnel,
        tunnel_unknown_destination => TunnelUnknownDestination,
        held_for_query => HeldForQuery,
        ttl_exceeded => TtlExceeded,
    }
);

counter_set!(
    /// What the parser recognised (a packet may count in several fields).
    ProtocolCounters, Protocol {
        non_ip => NonIp,
        ipv4 => Ipv4,
        ipv6 => Ipv6,
        vlan_tagged => VlanTagged,
        fragments => Fragment,
        tcp => Tcp,
        udp => Udp,
        sctp => Sctp,
        icmp => Icmp,
        icmpv6 => Icmpv6,
        other_l4 => OtherL4,
    }
);

/// Packets and bytes.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct PacketCounter {
    pub packets: u64,
    pub bytes: u64,
}

impl PacketCounter {
    #[inline(always)]
    pub fn count(&mut self, bytes: u64) {
        self.packets += 1;
        self.bytes += bytes;
    }

    /// `packets` at once (a GSO packet's segments).
    #[inline(always)]
    pub fn count_many(&mut self, packets: u64, bytes: u64) {
        self.packets += packets;
        self.bytes += bytes;
    }

    pub fn merge(&mut self, other: &Self) {
        self.packets += other.packets;
        self.bytes += other.bytes;
    }
}

/// What a program decided for a packet.
#[repr(u32)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Drop,
    Redirect,
    Tx,
    Aborted,
}

impl Verdict {
    pub const ALL: &'static [Verdict] = &[
        Verdict::Pass,
        Verdict::Drop,
        Verdict::Redirect,
        Verdict::Tx,
        Verdict::Aborted,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Drop => "drop",
            Verdict::Redirect => "redirect",
            Verdict::Tx => "tx",
            Verdict::Aborted => "aborted",
        }
    }
}

/// Packets and bytes per verdict.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct VerdictCounters {
    pub pass: PacketCounter,
    pub drop: PacketCounter,
    pub redirect: PacketCounter,
    pub tx: PacketCounter,
    pub aborted: PacketCounter,
}

impl VerdictCounters {
    #[inline(always)]
    pub fn counter_mut(&mut self, verdict: Verdict) -> &mut PacketCounter {
        match verdict {
            Verdict::Pass => &mut self.pass,
            Verdict::Drop => &mut self.drop,
            Verdict::Redirect => &mut self.redirect,
            Verdict::Tx => &mut self.tx,
            Verdict::Aborted => &mut self.aborted,
        }
    }

    pub const fn get(&self, verdict: Verdict) -> PacketCounter {
        match verdict {
            Verdict::Pass => self.pass,
            Verdict::Drop => self.drop,
            Verdict::Redirect => self.redirect,
            Verdict::Tx => self.tx,
            Verdict::Aborted => self.aborted,
        }
    }

    pub fn merge(&mut self, other: &Self) {
        self.pass.merge(&other.pass);
        self.drop.merge(&other.drop);
        self.redirect.merge(&other.redirect);
        self.tx.merge(&other.tx);
        self.aborted.merge(&other.aborted);
    }
}

/// Everything one program counts; the value of `tm_stats` (per CPU).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct ProgramStats {
    pub verdicts: VerdictCounters,
    pub drops: DropCounters,
    pub protocols: ProtocolCounters,
}

impl ProgramStats {
    pub fn merge(&mut self, other: &Self) {
        self.verdicts.merge(&other.verdicts);
        self.drops.merge(&other.drops);
        self.protocols.merge(&other.protocols);
    }
}

/// Index of a program's entry in `tm_stats`.
#[repr(u32)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ProgramSlot {
    XdpUplink,
    TcIngress,
    TcEgress,
    TcService,
    TcConduit,
}

impl ProgramSlot {
    pub const ALL: &'static [ProgramSlot] = &[
        ProgramSlot::XdpUplink,
        ProgramSlot::TcIngress,
        ProgramSlot::TcEgress,
        ProgramSlot::TcService,
        ProgramSlot::TcConduit,
    ];
    pub const COUNT: u32 = Self::ALL.len() as u32;

    pub const fn name(self) -> &'static str {
        match self {
            ProgramSlot::XdpUplink => "xdp_uplink",
            ProgramSlot::TcIngress => "tc_ingress",
            ProgramSlot::TcEgress => "tc_egress",
            ProgramSlot::TcService => "tc_service",
            ProgramSlot::TcConduit => "tc_conduit",
        }
    }
}

crate::assert_layout!(PacketCounter, size = 16, align = 8);
crate::assert_layout!(VerdictCounters, size = 5 * 16, align = 8);
crate::assert_layout!(
    ProgramStats,
    size = 5 * 16 + 8 * DropReason::COUNT + 8 * Protocol::COUNT,
    align = 8
);

#[cfg(feature = "user")]
crate::impl_pod!(ProgramStats, PacketCounter);
