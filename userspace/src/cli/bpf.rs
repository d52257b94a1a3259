//! `tapmesh bpf lb|overlay|mirror list`: the pinned maps, decoded by
//! `dataplane::inspect`, as tables (or `-o json`).

use std::{fmt::Write, path::Path, process::ExitCode};

use super::{
    args::{BpfCommand, BpfList},
    json::{show, Output},
    print, EXIT_CONFIG,
};
use crate::dataplane::{
    inspect::{self, InspectError, LbMaps, MirrorMaps, OverlayMaps},
    memory::{self, MapsMemory},
};

pub fn run(root: &Path, netns: Option<&str>, command: BpfCommand, output: Output) -> ExitCode {
    // Pins are not per namespace; interface names are.
    if let Some(name) = netns {
        if let Err(e) = crate::net::netns::enter(name) {
            eprintln!("tapmesh: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    }
    let text = inspect::pin_dir(root).and_then(|dir| match command {
        BpfCommand::Lb {
            command: BpfList::List,
        } => inspect::lb(&dir).map(|m| show(output, &m, render_lb)),
        BpfCommand::Overlay {
            command: BpfList::List,
        } => inspect::overlay(&dir).map(|m| show(output, &m, render_overlay)),
        BpfCommand::Mirror {
            command: BpfList::List,
        } => inspect::mirror(&dir).map(|m| show(output, &m, render_mirror)),
        BpfCommand::Maps { cpus } => {
            memory::maps(&dir, cpus).map(|m| show(output, &m, render_maps))
        }
    });
    match text {
        Ok(text) => {
            let _ = print(&text);
            ExitCode::SUCCESS
        }
        Err(e @ InspectError::NoPins(_)) => {
            eprintln!("tapmesh: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(e) => {
            eprintln!("tapmesh: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Bytes as MiB with two decimals.
fn mib(bytes: u64) -> String {
    format!("{:.2}", bytes as f64 / (1024.0 * 1024.0))
}

pub fn render_maps(m: &MapsMemory) -> String {
    let mut out =
        String::from("MAP              TYPE            KEY VALUE  ENTRIES    KERNEL BYTES   MiB\n");
    for map in &m.maps {
        let _ = writeln!(
            out,
            "{:<16} {:<15} {:<3} {:<6} {:<10} {:<14} {}{}",
            map.name,
            map.kind,
            map.key_size,
            map.value_size,
            map.max_entries,
            map.memlock,
            mib(map.memlock),
            if map.per_cpu { " (per CPU)" } else { "" }
        );
    }
    let _ = writeln!(
        out,
        "total {} bytes ({} MiB) on {} possible CPUs, {} of it in per-CPU maps",
        m.total,
        mib(m.total),
        m.possible_cpus,
        mib(m.per_cpu_total)
    );
    if m.estimate_cpus != m.possible_cpus {
        let _ = writeln!(
            out,
            "on {} CPUs: about {} MiB",
            m.estimate_cpus,
            mib(m.estimate_total)
        );
    }
    out
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "none".into()
    } else {
        items.join(",")
    }
}

fn named(ifindex: u32, name: &Option<String>) -> String {
    match name {
        Some(n) => format!("{n}({ifindex})"),
        None => format!("if{ifindex}"),
    }
}

pub fn render_lb(m: &LbMaps) -> String {
    let mut out =
        String::from("VIP                                      INDEX CONFIG PACKETS    BYTES\n");
    for v in &m.vips {
        let _ = writeln!(
            out,
            "{:<40} {:<5} {:<6} {:<10} {}",
            v.address, v.index, v.config, v.packets, v.bytes
        );
        for f in &v.flows {
            let _ = writeln!(
                out,
                "  flow bit {} -> stream {}: {} dst {} src {} from {}{} (counter {}: {} packets, {} bytes)",
                f.bit,
                f.stream,
                if f.protocols.is_empty() { "none".into() } else { f.protocols.join(",") },
                list(&f.dst_ports),
                list(&f.src_ports),
                list(&f.sources),
                if f.byte_matches > 0 {
                    format!(", {} byte matches", f.byte_matches)
                } else {
                    String::new()
                },
                f.counter,
                f.packets,
                f.bytes
            );
        }
    }
    out.push_str("\nSTREAM TABLE (base+size)     TARGET   ENTRIES  SHARE\n");
    for s in &m.streams {
        let table = format!("{}+{}", s.table_base, s.table_size);
        let mut first = true;
        let rows = s
            .shares
            .iter()
            .map(|sh| (sh.target.to_string(), sh.entries))
            .chain((s.unassigned > 0).then(|| ("none".to_string(), s.unassigned)));
        for (target, entries) in rows {
            let (id, t) = if first {
                (s.id.to_string(), table.as_str())
            } else {
                (String::new(), "")
            };
            first = false;
            let _ = writeln!(
                out,
                "{id:<6} {t:<21} {target:<8} {entries:<8} {:.2}%",
                100.0 * f64::from(entries) / f64::from(s.table_size)
            );
        }
    }
    out.push_str("\nTARGET KIND   VIA                                          PACKETS    BYTES\n");
    for t in &m.targets {
        let via = match &t.node {
            Some(node) => format!("node {node}"),
            None => format!(
                "{} {} from {}",
                named(t.ifindex, &t.interface),
                t.dst_mac,
                t.src_mac
            ),
        };
        let _ = writeln!(
            out,
            "{:<6} {:<6} {:<44} {:<10} {}",
            t.index, t.kind, via, t.packets, t.bytes
        );
    }
    out
}

pub fn render_overlay(m: &OverlayMaps) -> String {
    let mut out = String::from(
        "SERVICE IP                               ID    POLICY       INSTANCES  PACKETS    BYTES\n",
    );
    for s in &m.services {
        let instances: Vec<String> = s.instances.iter().map(|i| i.to_string()).collect();
        let _ = writeln!(
            out,
            "{:<40} {:<5} {:<12} {:<10} {:<10} {}",
            s.address,
            s.id,
            s.policy,
            list(&instances),
            s.packets,
            s.bytes
        );
    }
    out.push_str("\nINSTANCE KIND   NAMESPACE        INSTANCE IP      VIA                        GEN   PACKETS    BYTES\n");
    for i in &m.instances {
        let via = match &i.node {
            Some(node) => format!("node {node}"),
            None => named(i.ifindex, &i.interface),
        };
        let ns = match &i.ns_address6 {
            Some(v6) => format!("{} {v6}", i.ns_address),
            None => i.ns_address.clone(),
        };
        let _ = writeln!(
            out,
            "{:<8} {:<6} {:<16} {:<16} {:<26} {:<5} {:<10} {}",
            i.id, i.kind, ns, i.instance_address, via, i.generation, i.packets, i.bytes
        );
    }
    out
}

pub fn render_mirror(m: &MirrorMaps) -> String {
    let mut out = String::from(
        "SOURCE               FLOW  DESTINATION          DIRECTION VLANS        COPIES     BYTES      FAILED\n",
    );
    for r in &m.rules {
        let _ = writeln!(
            out,
            "{:<20} {:<5} {:<20} {:<9} {:<12} {:<10} {:<10} {}",
            named(r.source_ifindex, &r.source),
            r.flow,
            match r.ring {
                Some(slot) => format!("ring slot {slot}"),
                None => named(r.dest_ifindex, &r.dest),
            },
            r.direction,
            list(&r.vlans),
            r.packets,
            r.bytes,
            r.failed
        );
    }
    out.push_str("\nRING INTERFACE       XSK SLOT\n");
    for r in &m.rings {
        let _ = writeln!(out, "{:<20} {}", named(r.ifindex, &r.interface), r.slot);
    }
    out
}
