//! Every map the programs use. Names match `tapmesh_common::map_names`.

use aya_ebpf::{btf_maps::PerCpuArray, macros::btf_map};
use tapmesh_common::{ProgramSlot, ProgramStats};

/// Verdicts, drop reasons and protocols, one entry per [`ProgramSlot`].
#[btf_map]
#[allow(non_upper_case_globals)]
pub static tm_stats: PerCpuArray<ProgramStats, { ProgramSlot::COUNT as usize }> = PerCpuArray::new();
