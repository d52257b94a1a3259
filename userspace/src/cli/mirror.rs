//! `tapmesh tap-service …` and `tapmesh tap-flow …` output.

use std::fmt::Write;

use crate::admin::proto::{tap_service::Destination, TapListing};

pub fn render_services(l: &TapListing) -> String {
    let mut out = String::from("ID                   STATUS  DESTINATION\n");
    for s in &l.services {
        let dest = match &s.destination {
            Some(Destination::Interface(i)) => format!("interface {i}"),
            Some(Destination::Ring(r)) => {
                let mut parts = Vec::new();
                if !r.pcap.is_empty() {
                    parts.push(format!("pcap {}", r.pcap));
                }
                if !r.forward.is_empty() {
                    parts.push(format!("forward {}", r.forward));
                }
                format!("ring ({})", parts.join(", "))
            }
            None => "-".into(),
        };
        let _ = writeln!(out, "{:<20} {:<7} {dest}", s.id, s.status);
        if let Some(c) = &s.ring_counters {
            let _ = writeln!(out, "  ring received {}", c.received);
            for consumer in &c.consumers {
                let _ = writeln!(
                    out,
                    "  {} delivered {} lost {}",
                    consumer.name, consumer.delivered, consumer.lost
                );
            }
        }
        if !s.error.is_empty() {
            let _ = writeln!(out, "  error: {}", s.error);
        }
    }
    out
}

pub fn render_flows(l: &TapListing) -> String {
    let mut out = String::from(
        "ID                   SERVICE              SOURCE           DIRECTION VLANS        STATUS  MIRRORED (packets/bytes) FAILED\n",
    );
    for f in &l.flows {
        let vlans = if f.vlan_filter.is_empty() {
            "all"
        } else {
            &f.vlan_filter
        };
        let _ = writeln!(
            out,
            "{:<20} {:<20} {:<16} {:<9} {:<12} {:<7} {}/{} {}",
            f.id,
            f.tap_service,
            f.source,
            f.direction,
            vlans,
            f.status,
            f.mirrored_packets,
            f.mirrored_bytes,
            f.failed
        );
        if !f.error.is_empty() {
            let _ = writeln!(out, "  error: {}", f.error);
        }
    }
    out
}
