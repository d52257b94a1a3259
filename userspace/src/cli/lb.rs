//! `tapmesh lb …`: the load-balancing configuration through the admin API.

use std::{fmt::Write as _, path::PathBuf, process::ExitCode};

use super::args::LbCommand;

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

/// `tapmesh lb apply|list|delete`.
pub async fn run(socket: PathBuf, command: LbCommand, output: super::json::Output) -> ExitCode {
    use crate::admin::proto::{ListLbRequest, Name, TargetId};

    let mut client = match super::admin_client(&socket).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let result = match command {
        LbCommand::Apply { file } => {
            let spec = match crate::lb::service::read_spec(&file, crate::lb::model::Capacity::MAX) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("tapmesh: {e}");
                    return ExitCode::from(super::EXIT_CONFIG);
                }
            };
            client
                .apply_lb(crate::admin::lb_config(spec))
                .await
                .map(|_| String::new())
        }
        LbCommand::List => client
            .list_lb(ListLbRequest {})
            .await
            .map(|r| super::json::show(output, &r.into_inner(), render)),
        LbCommand::Delete {
            kind,
            name,
            identifier,
        } => match kind.to_lowercase().as_str() {
            "vip" => client
                .delete_vip(Name { name })
                .await
                .map(|_| String::new()),
            "stream" => client
                .delete_stream(Name { name })
                .await
                .map(|_| String::new()),
            "flow" => client
                .delete_flow(Name { name })
                .await
                .map(|_| String::new()),
            // As `lb list` shows it: "stream/identifier".
            _ => match identifier.map(|i| (name.clone(), i)).or_else(|| {
                let (stream, id) = name.rsplit_once('/')?;
                Some((stream.to_string(), id.parse().ok()?))
            }) {
                Some((name, identifier)) => client
                    .delete_target(TargetId {
                        stream: name,
                        identifier,
                    })
                    .await
                    .map(|_| String::new()),
                None => {
                    eprintln!("tapmesh: lb delete target needs the stream and the identifier (\"STREAM ID\" or \"STREAM/ID\" as lb list shows)");
                    return ExitCode::from(super::EXIT_CONFIG);
                }
            },
        },
    };
    super::print_result(result)
}
