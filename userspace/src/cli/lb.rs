//! `tapmesh lb …`: the load-balancing configuration through the admin API.

use std::fmt::Write as _;

use crate::admin::proto::{Count, LbListing};

fn counts(out: &mut String, title: &str, list: &[Count]) {
    let _ = writeln!(out, "{title}:");
    if list.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for c in list {
        let _ = writeln!(
            out,
            "  {:<24} {:>12} packets {:>14} bytes",
            c.name, c.packets, c.bytes
        );
    }
}

/// Renders the LB counters (also used by `tapmesh status`).
pub fn render_counters(out: &mut String, vips: &[Count], flows: &[Count], targets: &[Count]) {
    counts(out, "vips", vips);
    counts(out, "flows", flows);
    counts(out, "targets", targets);
}

/// Renders `tapmesh lb list`.
pub fn render(listing: &LbListing) -> String {
    let mut out = String::new();
    if let Some(c) = &listing.config {
        for s in &c.streams {
            let size = if s.table_size == 0 {
                "default".to_string()
            } else {
                s.table_size.to_string()
            };
            let _ = writeln!(
                out,
                "stream {} max_targets={} table_size={size}",
                s.name, s.max_targets
            );
        }
        for v in &c.vips {
            let _ = writeln!(out, "vip {} {}", v.name, v.address);
        }
        for f in &c.flows {
            let _ = writeln!(
                out,
                "flow {} priority={} stream={} vips={:?} protocols={:?} dports={:?} sports={:?} sources={:?} byte_matches={:?}",
                f.name, f.priority, f.stream, f.vips, f.protocols, f.destination_port_ranges, f.source_port_ranges, f.source_subnets, f.byte_matches
            );
        }
        for t in &c.targets {
            let via = match &t.via {
                Some(crate::admin::proto::target::Via::Local(l)) => {
                    format!("local {} {}", l.interface, l.mac)
                }
                Some(crate::admin::proto::target::Via::Remote(r)) => {
                    format!("remote node {}", r.node)
                }
                None => "?".into(),
            };
            let _ = writeln!(out, "target {}/{} {via}", t.stream, t.identifier);
        }
    }
    let _ = writeln!(out);
    render_counters(&mut out, &listing.vips, &listing.flows, &listing.targets);
    out
}
