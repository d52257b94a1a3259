//! `tapmesh tap-service …` and `tapmesh tap-flow …` output.

use std::{fmt::Write, path::PathBuf, process::ExitCode};

use super::args::{TapFlowCommand, TapServiceCommand};

use crate::admin::proto::{tap_service::Destination, TapFlow, TapService};

pub fn render_services(services: &[TapService]) -> String {
    let mut out = String::from("ID                   STATUS  DESTINATION\n");
    for s in services {
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
            let _ = writeln!(
                out,
                "  ring received {} socket dropped {} ring full {}",
                c.received, c.socket_dropped, c.ring_full
            );
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

pub fn render_flows(flows: &[TapFlow]) -> String {
    let mut out = String::from(
        "ID                   SERVICE              SOURCE           DIRECTION VLANS        STATUS  MIRRORED (packets/bytes) FAILED RING DROPS\n",
    );
    for f in flows {
        let vlans = if f.vlan_filter.is_empty() {
            "all"
        } else {
            &f.vlan_filter
        };
        let _ = writeln!(
            out,
            "{:<20} {:<20} {:<16} {:<9} {:<12} {:<7} {:<24} {:<6} {}",
            f.id,
            f.tap_service,
            f.source,
            f.direction,
            vlans,
            f.status,
            format!("{}/{}", f.mirrored_packets, f.mirrored_bytes),
            f.failed,
            f.ring_drops.map_or("-".into(), |d| d.to_string())
        );
        if !f.error.is_empty() {
            let _ = writeln!(out, "  error: {}", f.error);
        }
    }
    out
}

/// `tapmesh tap-service create|delete|list`.
pub async fn tap_service(
    socket: PathBuf,
    command: TapServiceCommand,
    output: super::json::Output,
) -> ExitCode {
    use crate::admin::proto::{ListTapsRequest, Ring, TapId};
    let mut client = match super::admin_client(&socket).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let result = match command {
        TapServiceCommand::Create {
            id,
            name,
            interface,
            pcap,
            forward,
        } => {
            let destination = match interface {
                Some(i) => Some(Destination::Interface(i)),
                None if pcap.is_some() || forward.is_some() => Some(Destination::Ring(Ring {
                    // Relative to where the command runs, not the daemon.
                    pcap: pcap
                        .map(|p| match std::path::absolute(&p) {
                            Ok(a) => a.display().to_string(),
                            Err(_) => p,
                        })
                        .unwrap_or_default(),
                    forward: forward.unwrap_or_default(),
                })),
                None => None,
            };
            client
                .create_tap_service(TapService {
                    id,
                    name: name.unwrap_or_default(),
                    destination,
                    ..Default::default()
                })
                .await
                .map(|_| String::new())
        }
        TapServiceCommand::Delete { id } => client
            .delete_tap_service(TapId { id })
            .await
            .map(|_| String::new()),
        TapServiceCommand::List => client
            .list_taps(ListTapsRequest {})
            .await
            .map(|r| super::json::show(output, &r.into_inner().services, |s| render_services(s))),
    };
    super::print_result(result)
}

/// `tapmesh tap-flow create|delete|list`.
pub async fn tap_flow(
    socket: PathBuf,
    command: TapFlowCommand,
    output: super::json::Output,
) -> ExitCode {
    use crate::admin::proto::{ListTapsRequest, TapId};
    let mut client = match super::admin_client(&socket).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let result = match command {
        TapFlowCommand::Create {
            id,
            name,
            tap_service,
            source,
            direction,
            vlan_filter,
        } => client
            .create_tap_flow(TapFlow {
                id,
                name: name.unwrap_or_default(),
                tap_service,
                source,
                direction: direction.as_str().into(),
                vlan_filter: vlan_filter.unwrap_or_default(),
                ..Default::default()
            })
            .await
            .map(|_| String::new()),
        TapFlowCommand::Delete { id } => client
            .delete_tap_flow(TapId { id })
            .await
            .map(|_| String::new()),
        TapFlowCommand::List => client
            .list_taps(ListTapsRequest {})
            .await
            .map(|r| super::json::show(output, &r.into_inner().flows, |f| render_flows(f))),
    };
    super::print_result(result)
}
