//! Counting, done once per packet through one map lookup.

use tapmesh_common::{DropReason, ProgramSlot, ProgramStats, Protocol, Verdict};

use crate::{
    headers::*,
    maps::tm_stats,
    parse::{Fragment, Parsed, L3},
};

/// This CPU's counters of one program (nothing is counted if the lookup fails,
/// which cannot happen for an index below the array size).
pub struct Stats(Option<*mut ProgramStats>);

impl Stats {
    #[inline(always)]
    pub fn of(slot: ProgramSlot) -> Self {
        Stats(tm_stats.get_ptr_mut(slot as u32))
    }

    #[inline(always)]
    fn with(&self, f: impl FnOnce(&mut ProgramStats)) {
        if let Some(stats) = self.0 {
            // SAFETY: a per-CPU map value, only this CPU's program touches it.
            f(unsafe { &mut *stats })
        }
    }

    #[inline(always)]
    pub fn verdict(&self, verdict: Verdict, bytes: u64) {
        self.with(|s| s.verdicts.counter_mut(verdict).count(bytes))
    }

    #[inline(always)]
    pub fn drop_reason(&self, reason: DropReason) {
        self.with(|s| s.drops.add_unknown(reason, 1))
    }

    /// A drop whose reason came as its index (see `tc::Packed`).
    #[inline(always)]
    pub fn drop_index(&self, index: u32) {
        self.with(|s| s.drops.add_index(index, 1))
    }

    /// `n` drops of one reason at once (frames lost after the program ran).
    #[inline(always)]
    pub fn drop_reasons(&self, reason: DropReason, n: u64) {
        self.with(|s| s.drops.add(reason, n))
    }

    #[inline(always)]
    pub fn parsed(&self, parsed: &Parsed) {
        self.with(|s| {
            let p = &mut s.protocols;
            if parsed.vlan_count != 0 {
                p.add(Protocol::VlanTagged, 1);
            }
            match parsed.l3 {
                L3::None => {
                    p.add(Protocol::NonIp, 1);
                    return;
                }
                L3::V4 => p.add(Protocol::Ipv4, 1),
                L3::V6 => p.add(Protocol::Ipv6, 1),
            }
            if parsed.fragment != Fragment::None {
                p.add(Protocol::Fragment, 1);
            }
            if !parsed.has_l4 {
                if parsed.fragment != Fragment::Later {
                    p.add(Protocol::OtherL4, 1);
                }
                return;
            }
            let l4 = match parsed.protocol {
                IPPROTO_TCP => Protocol::Tcp,
                IPPROTO_UDP => Protocol::Udp,
                IPPROTO_SCTP => Protocol::Sctp,
                IPPROTO_ICMP => Protocol::Icmp,
                _ => Protocol::Icmpv6,
            };
            p.add(l4, 1);
        })
    }
}
